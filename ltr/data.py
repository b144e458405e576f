"""CIFAR-100/10 files, the long-tailed training set, evaluation splits, device batches."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class LtrError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class DataError(LtrError):
    """The dataset files are missing, broken, or the request does not make sense."""


@dataclass(frozen=True)
class DatasetInfo:
    """Where a CIFAR variant lives and how its pickles are laid out."""

    folder: str  # name of the unpacked folder under the data root
    archive: str  # archive file name
    url: str  # official download address
    md5: str  # md5 of the archive
    train_files: tuple[str, ...]  # pickles holding the training split
    test_files: tuple[str, ...]  # pickles holding the test split
    meta_file: str  # pickle holding the class names
    label_key: bytes  # key of the label list in each split pickle
    names_key: bytes  # key of the class-name list in the meta pickle
    num_classes: int  # number of classes
    file_md5: tuple[tuple[str, str], ...] = ()  # (file, md5) of each unpacked file, official values


DATASETS: dict[str, DatasetInfo] = {
    "cifar100": DatasetInfo(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        file_md5=(
            ("train", "16019d7e3df5f24257cddd939b257f8d"),
            ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
            ("meta", "7973b15100ade9c7d40fb424638fde48"),
        ),
    ),
    "cifar10": DatasetInfo(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        file_md5=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
            ("test_batch", "40351d587109b95175f43aff81a1287e"),
            ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        ),
    ),
}

# Normalisation of the official code, used for both datasets (SPEC 1.4).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
# Group boundaries by training count (SPEC 1.2): many > 100, medium 20..100, few < 20.
MANY_ABOVE = 100
FEW_BELOW = 20
# Validation = the first VAL_PER_CLASS test images of each class (SPEC 1.3).
VAL_PER_CLASS = 20


def dataset_info(name: str) -> DatasetInfo:
    """Look up a dataset by name, with a clear error for unknown names."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def check_imbalance(imbalance: object) -> float:
    """Return the imbalance factor as a float, or explain why it is not one."""
    try:
        value = float(imbalance)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(
            f"imbalance factor {imbalance!r} is not a number; use e.g. 100, 50 or 10 "
            "(n_max / n_min; 1 means balanced)"
        ) from None
    if not np.isfinite(value) or value < 1:
        raise DataError(
            f"imbalance factor {imbalance!r} must be a number >= 1 (n_max / n_min); "
            "the paper uses 100, 50 and 10"
        )
    return value


# ---------------------------------------------------------------- download


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_message(root: Path, info: DatasetInfo, extra: str = "") -> str:
    return (
        f"{info.folder} not found under {root.resolve()}{extra}. Download it with "
        f"`python -m ltr data --root {root} --dataset "
        f"{'cifar100' if info.num_classes == 100 else 'cifar10'} --download` "
        f"(or pass download=True), or fetch {info.url} yourself (md5 {info.md5}) "
        f"and unpack it into {root}."
    )


def download(root: str | os.PathLike, dataset: str = "cifar100") -> Path:
    """Fetch and unpack a dataset into root atomically; skip when it is already there."""
    info = dataset_info(dataset)
    root = Path(root)
    target = root / info.folder
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = root / info.archive
    if not archive.exists():
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=info.archive + ".", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            urllib.request.urlretrieve(info.url, tmp)
            _check_md5(tmp, info)
            os.replace(tmp, archive)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, DataError):
                raise
            raise DataError(
                f"could not download {info.url} into {root.resolve()} ({exc}); fetch it by hand "
                f"(md5 {info.md5}) and place {info.archive} in {root}"
            ) from exc
    else:
        try:
            _check_md5(archive, info)
        except DataError:
            archive.unlink()
            raise
    _extract(archive, root, info)
    bad = [c for c in verify(root, dataset) if not c.ok]
    if bad:
        # A good archive unpacks to the official files; anything else must not be trained on.
        shutil.rmtree(target, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise DataError(
            f"{info.archive} unpacked to files that differ from the official ones "
            f"({', '.join(c.file for c in bad)}); both were removed. Download again with --download"
        )
    return target


@dataclass(frozen=True)
class FileCheck:
    """The md5 check of one unpacked dataset file."""

    file: str  # path of the file
    expected: str  # official md5
    got: str | None  # md5 found, None when the file is missing

    @property
    def ok(self) -> bool:
        """True when the file is there and matches the official md5."""
        return self.got == self.expected


def verify(root: str | os.PathLike, dataset: str = "cifar100") -> list[FileCheck]:
    """md5 of every unpacked file of a dataset against the official values (missing files included)."""
    info = dataset_info(dataset)
    folder = Path(root) / info.folder
    if not folder.is_dir():
        raise DataError(_missing_message(Path(root), info))
    return [
        FileCheck(str(folder / name), md5, _md5(folder / name) if (folder / name).is_file() else None)
        for name, md5 in info.file_md5
    ]


def _check_md5(path: Path, info: DatasetInfo) -> None:
    got = _md5(path)
    if got != info.md5:
        raise DataError(
            f"{path.name} has md5 {got}, expected {info.md5}; the file was removed. "
            f"Download it again from {info.url}"
        )


def _extract(archive: Path, root: Path, info: DatasetInfo) -> None:
    # Unpack beside the target and rename, so an interrupted unpack leaves no half folder.
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".unpack-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        unpacked = staging / info.folder
        if not unpacked.is_dir():
            raise DataError(f"{archive} does not contain {info.folder}/; download it again")
        os.replace(unpacked, root / info.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# load_cifar_lt has a flag named `download`; this alias keeps the function reachable there.
_fetch = download


# ---------------------------------------------------------------- reading


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle only what the CIFAR files hold: builtins and numpy arrays."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DataError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); the file is "
            f"truncated or foreign. Delete {path.parent} and download again with --download"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not the CIFAR dict; delete {path.parent} "
            "and download again with --download"
        )
    return obj


def _read_split_file(path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_pickle(path)
    for key in (b"data", info.label_key):
        if key not in obj:
            raise DataError(
                f"{path} has no {key!r} entry (keys: {sorted(obj)[:6]}); it is not a "
                f"{info.folder} file. Delete {path.parent} and download again with --download"
            )
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[info.label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: image rows have shape {data.shape[1:]} but CIFAR rows hold 3072 values "
            "(3 x 32 x 32); the file is damaged or foreign, download it again with --download"
        )
    if data.dtype != np.uint8:
        raise DataError(f"{path}: images are {data.dtype}, expected uint8; download it again")
    if len(labels) != len(data):
        raise DataError(
            f"{path}: {len(data)} images but {len(labels)} labels; download it again"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(
            f"{path}: labels outside 0..{info.num_classes - 1}; is this the right dataset?"
        )
    # Rows are 1024 R, 1024 G, 1024 B, each plane row-major: that is exactly N x 3 x 32 x 32.
    return data.reshape(-1, 3, 32, 32), labels


def read_split(
    root: str | os.PathLike, dataset: str = "cifar100", split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Read one split as (uint8 images N x 3 x 32 x 32, int64 labels) without the network."""
    info = dataset_info(dataset)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    folder = Path(root) / info.folder
    names = info.train_files if split == "train" else info.test_files
    parts = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(_missing_message(Path(root), info, f" (looked for {path})"))
        parts.append(_read_split_file(path, info))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels


def read_class_names(root: str | os.PathLike, dataset: str = "cifar100") -> list[str]:
    """Class names from the meta pickle (falls back to numbers when it is absent)."""
    info = dataset_info(dataset)
    path = Path(root) / info.folder / info.meta_file
    if not path.is_file():
        return [str(i) for i in range(info.num_classes)]
    obj = _load_pickle(path)
    names = obj.get(info.names_key)
    if names is None or len(names) != info.num_classes:
        return [str(i) for i in range(info.num_classes)]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


# ---------------------------------------------------------------- long tail


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Per-class counts of the exponential profile: int(n_max * (1/IF) ** (i / (C - 1)))."""
    imbalance = check_imbalance(imbalance)
    if num_classes < 2:
        return [int(n_max)] * num_classes
    return [
        int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)
    ]


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
    return {
        "many": [c for c, n in enumerate(counts) if n > MANY_ABOVE],
        "medium": [c for c, n in enumerate(counts) if FEW_BELOW <= n <= MANY_ABOVE],
        "few": [c for c, n in enumerate(counts) if n < FEW_BELOW],
    }


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
        return {
            "dataset": self.dataset,
            "imbalance": self.imbalance,
            "classes": self.num_classes,
            "train": int(len(self.train_y)),
            "test": int(len(self.test_y)),
            "val": int(len(self.val_idx)),
            "heldout": int(len(self.heldout_idx)),
            "groups": {k: len(v) for k, v in self.groups.items()},
            "counts": [int(n) for n in self.counts],
        }


def load_cifar_lt(
    root: str | os.PathLike = "data",
    dataset: str = "cifar100",
    imbalance: float = 100,
    download: bool = False,
) -> LTData:
    """Build CIFAR100-LT / CIFAR10-LT from the files under root (SPEC 1.2 and 1.3)."""
    info = dataset_info(dataset)
    imbalance = check_imbalance(imbalance)
    root = Path(root)
    if download:
        _fetch(root, dataset)
    elif not (root / info.folder).is_dir():
        raise DataError(_missing_message(root, info))
    train_x, train_y = read_split(root, dataset, "train")
    test_x, test_y = read_split(root, dataset, "test")
    per_class = np.bincount(train_y, minlength=info.num_classes)
    n_max = int(per_class.max()) if len(per_class) else 0
    if per_class.min() != n_max:
        raise DataError(
            f"the training split under {root / info.folder} is not balanced "
            f"({per_class.min()}..{n_max} images a class); the LT set is built from the "
            "balanced original"
        )
    counts = long_tail_counts(n_max, info.num_classes, imbalance)
    if min(counts) < 1:
        raise DataError(
            f"imbalance factor {imbalance:g} leaves a class with no image ({n_max} a class in "
            f"the data); use a smaller factor (at most {n_max})"
        )
    keep = long_tail_indices(train_y, counts)
    val_idx, heldout_idx = split_test(test_y)
    return LTData(
        dataset=dataset,
        imbalance=imbalance,
        train_x=train_x[keep],
        train_y=train_y[keep],
        test_x=test_x,
        test_y=test_y,
        counts=counts,
        class_names=read_class_names(root, dataset),
        val_idx=val_idx,
        heldout_idx=heldout_idx,
    )


# ---------------------------------------------------------------- device batches


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

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        train: bool = True,
        sampling: str = "instance",
        num_classes: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if sampling not in ("instance", "balanced"):
            raise LtrError(f"unknown sampling {sampling!r}; use 'instance' or 'balanced'")
        self.device = torch.device(device)
        self.x = torch.as_tensor(images).to(self.device)
        self.y = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.batch_size = int(batch_size)
        self.train = train
        self.sampling = sampling
        # (rank, world): every process draws and augments the same global batch, then keeps its slice,
        # so the union of the shards is exactly the single-process batch.
        self.rank, self.world = shard
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        c = int(num_classes if num_classes is not None else int(self.y.max()) + 1)
        counts = torch.bincount(self.y, minlength=c)
        self._class_counts = counts
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
        pick = torch.randint(
            0, len(self._present), (n,), device=self.device, generator=self.generator
        )
        cls = self._present[pick]
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
