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
