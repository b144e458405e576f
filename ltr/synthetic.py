"""Small files in the exact CIFAR pickle layouts, with learnable classes, for tests and demos."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .data import DATASETS


def _class_images(labels: np.ndarray, rng: np.random.Generator, learnable: bool) -> np.ndarray:
    n = len(labels)
    if not learnable:
        return np.zeros((n, 3072), dtype=np.uint8)
    # Each class gets its own colour (levels of R, G, B) plus noise, so a tiny net can learn it.
    levels = np.stack([labels % 5, (labels // 5) % 5, (labels // 25) % 5], axis=1)
    colour = 25 + 50 * levels  # n x 3, in 25..225
    img = colour[:, :, None] + rng.integers(-20, 21, size=(n, 3, 1024))
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar(root: str | os.PathLike, dataset: str = "cifar100", train_per_class: int = 200,
                     test_per_class: int = 25, learnable: bool = True, seed: int = 0) -> Path:
    """Write a dataset folder in the official layout (not real CIFAR: synthetic images)."""
    info = DATASETS[dataset]
    rng = np.random.default_rng(seed)
    folder = Path(root) / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    c = info.num_classes

    def split(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.tile(np.arange(c), per_class)  # interleaved, as in the real files
        rng.shuffle(labels)
        return _class_images(labels, rng, learnable), labels

    def dump_split(name: str, x: np.ndarray, y: np.ndarray, filenames: list[bytes]) -> None:
        obj = {b"data": x, info.label_key: y.tolist(), b"filenames": filenames}
        if dataset == "cifar100":
            obj[b"coarse_labels"] = (y // 5).tolist()
        _dump(folder / name, obj)

    x, y = split(train_per_class)
    parts = np.array_split(np.arange(len(y)), len(info.train_files))
    for name, idx in zip(info.train_files, parts, strict=True):
        dump_split(name, x[idx], y[idx], [f"img_{i}.png".encode() for i in idx])
    x, y = split(test_per_class)
    dump_split(info.test_files[0], x, y, [f"test_{i}.png".encode() for i in range(len(y))])
    _dump(folder / info.meta_file, {info.names_key: [f"class{i}".encode() for i in range(c)]})
    return folder
