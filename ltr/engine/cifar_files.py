"""CIFAR files on disk: where each variant lives, download with the archive's md5, the official files'
md5s, and reading the pickles without running foreign code."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


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
        folder="cifar-100-python", archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        train_files=("train",), test_files=("test",), meta_file="meta",
        label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100,
        file_md5=(("train", "16019d7e3df5f24257cddd939b257f8d"), ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
                  ("meta", "7973b15100ade9c7d40fb424638fde48")),
    ),
    "cifar10": DatasetInfo(
        folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key=b"labels", names_key=b"label_names", num_classes=10,
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


def dataset_info(name: str) -> DatasetInfo:
    """Look up a dataset by name, with a clear error for unknown names."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_message(root: Path, info: DatasetInfo, extra: str = "") -> str:
    return (f"{info.folder} not found under {root.resolve()}{extra}. Download it with `python -m ltr data "
            f"--root {root} --dataset {'cifar100' if info.num_classes == 100 else 'cifar10'} --download` "
            f"(or pass download=True), or fetch {info.url} yourself (md5 {info.md5}) and unpack it into "
            f"{root}.")


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
            raise DataError(f"could not download {info.url} into {root.resolve()} ({exc}); fetch it by hand "
                            f"(md5 {info.md5}) and place {info.archive} in {root}") from exc
    else:
        _check_md5(archive, info)
    _extract(archive, root, info)
    bad = [c for c in verify(root, dataset) if not c.ok]
    if bad:
        # A good archive unpacks to the official files; anything else must not be trained on.
        shutil.rmtree(target, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise DataError(f"{info.archive} unpacked to files that differ from the official ones "
                        f"({', '.join(c.file for c in bad)}); both were removed. Download again with "
                        "--download")
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
        raise DataError(missing_message(Path(root), info))
    return [FileCheck(str(folder / name), md5, _md5(folder / name) if (folder / name).is_file() else None)
            for name, md5 in info.file_md5]


def _check_md5(path: Path, info: DatasetInfo) -> None:
    got = _md5(path)
    if got != info.md5:
        path.unlink(missing_ok=True)
        raise DataError(f"{path.name} has md5 {got}, expected {info.md5}; the file was removed. "
                        f"Download it again from {info.url}")


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


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle only what the CIFAR files hold: builtins and numpy arrays."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # _codecs: protocol-2 pickles' bytes
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
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); the file is "
                        f"truncated or foreign. Delete {path.parent} and download again with "
                        "--download") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the CIFAR dict; delete {path.parent} "
                        "and download again with --download")
    return obj


def _read_split_file(path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    obj = _load_pickle(path)
    for key in (b"data", info.label_key):
        if key not in obj:
            raise DataError(f"{path} has no {key!r} entry (keys: {sorted(obj)[:6]}); it is not a "
                            f"{info.folder} file. Delete {path.parent} and download again with --download")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[info.label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: image rows have shape {data.shape[1:]} but CIFAR rows hold 3072 values "
                        "(3 x 32 x 32); the file is damaged or foreign, download it again with --download")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: images are {data.dtype}, expected uint8; download it again")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels; download it again")
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(f"{path}: labels outside 0..{info.num_classes - 1}; is this the right dataset?")
    # Rows are 1024 R, 1024 G, 1024 B, each plane row-major: that is exactly N x 3 x 32 x 32.
    return data.reshape(-1, 3, 32, 32), labels


def read_split(root: str | os.PathLike, dataset: str = "cifar100",
               split: str = "train") -> tuple[np.ndarray, np.ndarray]:
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
            raise DataError(missing_message(Path(root), info, f" (looked for {path})"))
        parts.append(_read_split_file(path, info))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_class_names(root: str | os.PathLike, dataset: str = "cifar100") -> list[str]:
    """Class names from the meta pickle (falls back to numbers when it is absent)."""
    info = dataset_info(dataset)
    path = Path(root) / info.folder / info.meta_file
    names = _load_pickle(path).get(info.names_key) if path.is_file() else None
    if names is None or len(names) != info.num_classes:
        return [str(i) for i in range(info.num_classes)]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
