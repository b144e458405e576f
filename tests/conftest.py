"""Shared fixtures: synthetic datasets in the exact CIFAR pickle layouts, written by the tests, and runs
that several test modules read."""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that spin while waiting thrash when processes share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The cores shared out among pytest-xdist workers (-n 2 on 2 cores: one thread each, in the workers and
# in the processes they start), so that parallel workers do not oversubscribe the CPU. Results within a
# process do not depend on the count.
THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ltr.config import preset_config  # noqa: E402
from ltr.synthetic import write_fake_cifar  # noqa: E402
from ltr.train import stage2_from, train_stage1, train_stage2  # noqa: E402

torch.set_num_threads(THREADS)


def _shared_tmp(factory: pytest.TempPathFactory) -> Path:
    """A temporary folder all pytest-xdist workers of this session share (the session's own without)."""
    base = factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


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
    # Unpacked once per session, also under pytest-xdist: the first worker unpacks, the others wait.
    from filelock import FileLock

    out = _shared_tmp(tmp_path_factory) / "real-cifar100"
    with FileLock(str(out) + ".lock"):
        if not (out / "cifar-100-python" / "train").is_file():
            with tarfile.open(archive) as tar:  # compression read from the file
                tar.extractall(out, filter="data")
    if not (out / "cifar-100-python" / "train").is_file():
        pytest.fail(f"{archive} does not unpack to cifar-100-python/train")
    return out


@pytest.fixture(scope="session")
def smoke_runs(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-epoch smoke stage-1 run on small_root and stage-2 runs on it: "s1", post-hoc "tau" (1.9)
    and "l2", retrained "cb-wd-max" (one epoch). Shared by the modules that only read runs."""
    exp = tmp_path_factory.mktemp("smoke_runs")
    runs = {"s1": exp / "stage1"}
    train_stage1(preset_config("stage1", "smoke", epochs=1), runs["s1"], root=small_root, device="cpu",
                 progress=False)
    for key, fields in (("tau", {"posthoc": "tau-norm", "tau": 1.9}), ("l2", {"posthoc": "l2norm"}),
                        ("cb-wd-max", {"loss": "cb", "wd": 0.1, "maxnorm": 0.1, "epochs": 1})):
        runs[key] = exp / key
        train_stage2(stage2_from(runs["s1"], "smoke", **fields), runs[key], root=small_root, device="cpu",
                     progress=False)
    return runs


# Under pytest-xdist (`make test`: -n 2 --dist loadfile) every module runs on one worker, so that its
# fixtures (a trained table, a sweep, a notebook execution) are made once, not once per worker. Modules
# are handed out in collection order, so the longest go first (seconds per module on a quiet 2-core
# machine, one thread a worker, 2026-12-01) and the short ones fill the gaps at the end. (Not
# --dist loadgroup: pytest 9 dropped what xdist's groups relied on, and every test became its own unit.)
LONGEST_FIRST = ("test_notebooks_real",  # both notebooks on the real data, 266 s (fresh-clone run at 48a3728)
                 "test_notebooks",  # both notebooks on the synthetic files, 104 s (same run)
                 "test_tables", "test_precision", "test_sweep", "test_gpu_reference", "test_compare",
                 "test_train", "test_real")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the longest modules first (LONGEST_FIRST), the rest after them in collection order."""

    def rank(item: pytest.Item) -> int:
        module = item.path.stem
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each module stays the collection order


def stop_stage1_after(epochs: int, cfg: object, out: Path, **kwargs: object) -> int:
    """Train a stage-1 run until the time limit (LTR_DEADLINE) stops it after `epochs` epochs, as a run
    cut short would stop; returns the epoch its checkpoint holds."""
    import ltr.engine.checkpoint as checkpoint
    from ltr.errors import TimeLimitReached

    # The checkpointer reads the clock once before the first epoch and once after each: the limit is
    # passed at the end of epoch `epochs`.
    readings = iter([0.0] * epochs + [float("inf")] * 10_000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "time", type("Clock", (), {"time": staticmethod(lambda: next(readings))}))
        mp.setenv(checkpoint.DEADLINE_ENV, "1")
        with pytest.raises(TimeLimitReached):
            train_stage1(cfg, out, **kwargs)
    return int(torch.load(Path(out) / "ckpt.pt", weights_only=True)["epoch"])
