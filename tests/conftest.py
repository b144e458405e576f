"""Shared fixtures: synthetic datasets in the exact CIFAR pickle layouts, written by the tests."""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that spin while waiting thrash when processes share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ltr.synthetic import write_fake_cifar

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-100 layout, 200 train / 25 test images a class, learnable colours."""
    root = tmp_path_factory.mktemp("small")
    write_fake_cifar(root, "cifar100", train_per_class=200, test_per_class=25)
    write_fake_cifar(root, "cifar10", train_per_class=200, test_per_class=25)
    return root


@pytest.fixture(scope="session")
def full_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-size layouts (500 / 5,000 a class) with blank images, for the exact totals."""
    root = tmp_path_factory.mktemp("full")
    write_fake_cifar(root, "cifar100", train_per_class=500, test_per_class=100, learnable=False)
    write_fake_cifar(root, "cifar10", train_per_class=5000, test_per_class=1000, learnable=False)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-100 layout at its smallest for IF 100 (100 train / 10 test a class): table runs."""
    root = tmp_path_factory.mktemp("tiny")
    write_fake_cifar(root, "cifar100", train_per_class=100, test_per_class=10)
    return root


REAL_ARCHIVE_ENV = "LTR_CIFAR100_ARCHIVE"  # the official pickles packed as .tar.xz / .tar.gz (CI sets it)
REAL_ROOT_ENV = "LTR_CIFAR100_ROOT"  # or a data root that already holds cifar-100-python/


@pytest.fixture(scope="session")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding the real CIFAR-100, unpacked once per session into a temporary folder.

    Skips (with the reason) on a clone without the data: set LTR_CIFAR100_ARCHIVE to
    cifar-100-python.tar.xz, or LTR_CIFAR100_ROOT to a root holding cifar-100-python/.
    """
    import tarfile

    root = os.environ.get(REAL_ROOT_ENV)
    if root:
        if not (Path(root) / "cifar-100-python" / "train").is_file():
            pytest.skip(f"{REAL_ROOT_ENV}={root} holds no cifar-100-python/train")
        return Path(root)
    archive = os.environ.get(REAL_ARCHIVE_ENV)
    if not archive or not Path(archive).is_file():
        pytest.skip(f"real CIFAR-100 not given: set {REAL_ARCHIVE_ENV} to cifar-100-python.tar.xz "
                    f"(found: {archive!r}) or {REAL_ROOT_ENV} to a data root")
    out = tmp_path_factory.mktemp("real")
    with tarfile.open(archive) as tar:  # compression read from the file
        tar.extractall(out, filter="data")
    if not (out / "cifar-100-python" / "train").is_file():
        pytest.fail(f"{archive} does not unpack to cifar-100-python/train")
    return out
