"""The long-tailed training set, Many / Medium / Few, the evaluation splits, and batches on the device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .engine import cifar_files
from .engine.cifar_files import (  # noqa: F401 - the file facts, re-exported where users look
    DATASETS,
    DatasetInfo,
    dataset_info,
    missing_message,
    read_class_names,
    read_split,
    verify,
)
from .errors import DataError, LtrError

# Normalisation of the official code, used for both datasets (docs/recipe.md §1.4).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
# Group boundaries by training count (docs/recipe.md §1.2): many > 100, medium 20..100, few < 20.
MANY_ABOVE = 100
FEW_BELOW = 20
# Validation = the first VAL_PER_CLASS test images of each class (docs/recipe.md §1.3).
VAL_PER_CLASS = 20


def check_imbalance(imbalance: object) -> float:
    """Return the imbalance factor as a float, or explain why it is not one."""
    try:
        value = float(imbalance)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"imbalance factor {imbalance!r} is not a number; use e.g. 100, 50 or 10 "
                        "(n_max / n_min; 1 means balanced)") from None
    if not np.isfinite(value) or value < 1:
        raise DataError(f"imbalance factor {imbalance!r} must be a number >= 1 (n_max / n_min); "
                        "the paper uses 100, 50 and 10")
    return value


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class counts of the exponential profile: int(n_max * (1/IF) ** (i / (C - 1)))."""
    imbalance = check_imbalance(imbalance)
    if num_classes < 2:
        return [int(n_max)] * num_classes
    return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def long_tail_indices(labels: np.ndarray, counts: list[int]) -> np.ndarray:
    """Indices of the FIRST counts[c] images of each class c, in file order (official recipe)."""
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise DataError(f"class {c} has {len(idx)} training images but {n} were asked for")
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def class_groups(counts: list[int] | np.ndarray) -> dict[str, list[int]]:
    """Many (> 100), Medium (20..100) and Few (< 20) classes by training count."""
    counts = list(counts)
    return {"many": [c for c, n in enumerate(counts) if n > MANY_ABOVE],
            "medium": [c for c, n in enumerate(counts) if FEW_BELOW <= n <= MANY_ABOVE],
            "few": [c for c, n in enumerate(counts) if n < FEW_BELOW]}


def split_test(labels: np.ndarray, per_class: int = VAL_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """Validation = first per_class test images of each class in file order; the rest held out."""
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        val[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(val), np.flatnonzero(~val)


@dataclass
class LTData:
    """A long-tailed training set and the balanced test set, as uint8 arrays on the host."""

    dataset: str  # dataset name
    imbalance: float  # n_max / n_min
    train_x: np.ndarray  # uint8, N x 3 x 32 x 32
    train_y: np.ndarray  # int64 labels
    test_x: np.ndarray  # uint8, M x 3 x 32 x 32
    test_y: np.ndarray  # int64 labels
    counts: list[int]  # training images per class
    class_names: list[str] = field(default_factory=list)  # human-readable class names
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # test rows
    heldout_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # test rows

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.counts)

    @property
    def synthetic(self) -> bool:
        """True for files written by ltr.synthetic (class names class0, class1, ...): not CIFAR."""
        return bool(self.class_names) and all(n == f"class{i}" for i, n in enumerate(self.class_names))

    @property
    def groups(self) -> dict[str, list[int]]:
        """Many/Medium/Few class ids."""
        return class_groups(self.counts)

    def summary(self) -> dict:
        """Split sizes, group sizes and the count profile as plain JSON types."""
        return {"dataset": self.dataset, "imbalance": self.imbalance, "classes": self.num_classes,
                "train": int(len(self.train_y)), "test": int(len(self.test_y)), "val": int(len(self.val_idx)),
                "heldout": int(len(self.heldout_idx)), "groups": {k: len(v) for k, v in self.groups.items()},
                "counts": [int(n) for n in self.counts]}


def load_cifar_lt(root: str | os.PathLike = "data", dataset: str = "cifar100", imbalance: float = 100,
                  download: bool = False) -> LTData:
    """Build CIFAR100-LT / CIFAR10-LT from the files under root (docs/recipe.md §1.2 and §1.3)."""
    info = dataset_info(dataset)
    imbalance = check_imbalance(imbalance)
    root = Path(root)
    if download:
        cifar_files.download(root, dataset)
    elif not (root / info.folder).is_dir():
        raise DataError(missing_message(root, info))
    train_x, train_y = read_split(root, dataset, "train")
    test_x, test_y = read_split(root, dataset, "test")
    per_class = np.bincount(train_y, minlength=info.num_classes)
    n_max = int(per_class.max()) if len(per_class) else 0
    if per_class.min() != n_max:
        raise DataError(f"the training split under {root / info.folder} is not balanced ({per_class.min()}.."
                        f"{n_max} images a class); the LT set is built from the balanced original")
    counts = long_tail_counts(n_max, info.num_classes, imbalance)
    if min(counts) < 1:
        raise DataError(f"imbalance factor {imbalance:g} leaves a class with no image ({n_max} a class in "
                        f"the data); use a smaller factor (at most {n_max})")
    keep = long_tail_indices(train_y, counts)
    val_idx, heldout_idx = split_test(test_y)
    return LTData(dataset=dataset, imbalance=imbalance, train_x=train_x[keep], train_y=train_y[keep],
                  test_x=test_x, test_y=test_y, counts=counts, class_names=read_class_names(root, dataset),
                  val_idx=val_idx, heldout_idx=heldout_idx)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu; a clear error when cuda is asked but absent."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LtrError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


_NORM_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float, scaled to [0, 1] and normalised per channel."""
    dev = x_uint8.device
    if dev not in _NORM_CACHE:
        # Built once per device: a fresh constant per batch would be a host->device copy per step.
        mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(STD, device=dev).view(1, 3, 1, 1) * 255.0
        _NORM_CACHE[dev] = (mean, 1.0 / std)
    mean, inv_std = _NORM_CACHE[dev]
    return (x_uint8.float() - mean) * inv_std


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image plus horizontal flip (p=0.5), one gather per batch."""
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    flip = torch.rand((b, 1), device=dev, generator=generator) < 0.5
    rows = oy + torch.arange(h, device=dev)
    cols_ar = torch.arange(w, device=dev)
    # A flipped crop reads its window's columns right to left.
    cols = ox + torch.where(flip, (w - 1) - cols_ar, cols_ar)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    # Advanced indices around a slice put the batch/row/col dims first: result is B x H x W x C,
    # whose permute is a channels_last tensor for free.
    out = padded[bi, :, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2)


class DeviceLoader:
    """Batches from a split kept whole on the device as uint8; shuffling and augmentation there."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, batch_size: int,
                 device: str | torch.device = "cpu", seed: int = 0, train: bool = True,
                 sampling: str = "instance", num_classes: int | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        if sampling not in ("instance", "balanced"):
            raise LtrError(f"unknown sampling {sampling!r}; use 'instance' or 'balanced'")
        self.device = torch.device(device)
        self.x = torch.as_tensor(images).to(self.device)
        self.y = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.batch_size = int(batch_size)
        self.train, self.sampling = train, sampling
        # (rank, world): every process draws and augments the same global batch, then keeps its slice,
        # so the union of the shards is exactly the single-process batch.
        self.rank, self.world = shard
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        c = int(num_classes if num_classes is not None else int(self.y.max()) + 1)
        self._class_counts = counts = torch.bincount(self.y, minlength=c)
        self._class_start = torch.cumsum(counts, 0) - counts
        self._by_class = torch.argsort(self.y, stable=True)
        self._present = torch.nonzero(counts > 0).flatten()

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def epoch_indices(self) -> torch.Tensor:
        """One epoch's sample order: a permutation, or class-balanced draws of the same length."""
        n = len(self.y)
        if not self.train:
            return torch.arange(n, device=self.device)
        if self.sampling == "instance":
            return torch.randperm(n, device=self.device, generator=self.generator)
        # Class uniform (among classes that have images), then an image uniform within it.
        cls = self._present[torch.randint(0, len(self._present), (n,), device=self.device,
                                          generator=self.generator)]
        u = torch.rand(n, device=self.device, generator=self.generator)
        offset = (u * self._class_counts[cls]).long().clamp_max(self._class_counts[cls] - 1)
        return self._by_class[self._class_start[cls] + offset]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_indices()
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x, y = self.x[idx], self.y[idx]
            if self.train:
                x = augment(x, self.generator)
            if self.world > 1:
                x, y = x[self.rank :: self.world], y[self.rank :: self.world]
            yield normalize(x), y

    def state_dict(self) -> dict:
        """The sampler's RNG state, so a resumed run draws the same batches."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the RNG state saved by state_dict."""
        self.generator.set_state(state["generator"])
