"""Helpers of scripts/gpu_reference.sh: the data check, the environment record and the one archive.

Run from the repository root with the `python3` on the PATH (no install): `python3
scripts/gpu_reference.py prepare ROOT ENV_JSON [table1 flags]` and `python3 scripts/gpu_reference.py
archive WORK OUT NAME`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `ltr` from this checkout, not installed

FOLDER = "cifar-100-python"
PACKS = ("cifar-100-python-lt50.tar.xz", "cifar-100-python.tar.xz", "cifar-100-python.tar.gz")
# The lt50 pack's train file: official test and meta, training pixels only where IF >= 50 reads them
# (../shared/data/README.md); any other train md5 is not the real data.
LT50_TRAIN_MD5 = "9328adf5d1688c4cf58d48bf14ebd671"
LT50_MIN_IMBALANCE = 50.0
ARCHIVE_LIMIT = 16 * 2**20  # what one returned file may hold
MAX_FILES = 8  # what the GPU machine's $OUT may return
SKIP_SUFFIXES = (".pt", ".lock")  # checkpoints, cached features, run locks: never in the archive


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _unpack(root: Path) -> str:
    """Unpack the first pack found in root (once: skipped when the folder is there); what was done."""
    if all((root / FOLDER / name).is_file() for name in ("train", "test", "meta")):
        return f"found {root / FOLDER}"
    for name in PACKS:
        pack = root / name
        if pack.is_file():
            t0 = time.time()
            with tarfile.open(pack) as tar:  # compression read from the file
                tar.extractall(root, filter="data")
            return f"unpacked {pack} in {time.time() - t0:.1f} s"
    raise SystemExit(f"gpu_reference: no {root / FOLDER}/ and none of {', '.join(PACKS)} in {root}: "
                     f"copy ../shared/data/{PACKS[0]} into {root}/ (and carry it to the GPU machine)")


def _imbalances(flags: list[str]) -> list[float]:
    """The --imbalance values among table1 flags (default 100)."""
    values: list[float] = []
    for i, flag in enumerate(flags):
        if flag == "--imbalance":
            for v in flags[i + 1:]:
                if v.startswith("--"):
                    break
                values.append(float(v))
    return values or [100.0]


def check_data(root: Path, flags: list[str]) -> dict:
    """Unpack if needed, then md5 every file: official, the lt50 pack, or not the real data (said)."""
    from ltr.data import dataset_info

    action = _unpack(root)
    official = dict(dataset_info("cifar100").file_md5)
    files = {}
    for name in ("train", "test", "meta"):
        path = root / FOLDER / name
        if not path.is_file():
            raise SystemExit(f"gpu_reference: {path} is missing after unpacking; the pack is damaged")
        files[name] = _md5(path)
    if all(files[n] == official[n] for n in files):
        kind = "official CIFAR-100"
    elif files["train"] == LT50_TRAIN_MD5 and all(files[n] == official[n] for n in ("test", "meta")):
        kind = "lt50 pack (exact for imbalance factors >= 50)"
        low = [i for i in _imbalances(flags) if i < LT50_MIN_IMBALANCE]
        if low:
            raise SystemExit(f"gpu_reference: the lt50 pack holds the training images of imbalance factors "
                             f">= 50 only; --imbalance {low} needs the full {FOLDER}")
    else:
        kind = "NOT the real CIFAR-100 (md5 differs: synthetic or modified files)"
    return {"root": str(root), "action": action, "kind": kind, "md5": files}


def environment() -> dict:
    """Python, torch, CUDA, cuDNN, GPU and CPU of this machine."""
    import torch

    env: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
    }
    for mod in ("torchvision", "numpy", "pandas", "matplotlib", "tqdm"):
        env[mod] = __import__(mod).__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                   gpu_capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    from ltr.engine.rundir import git_commit

    env["git_commit"] = git_commit()
    return env


def prepare(root: str, env_json: str, flags: list[str]) -> None:
    """Check the data and write environment + data record to env_json; prints both."""
    info = {**environment(), "data": check_data(Path(root), flags)}
    Path(env_json).parent.mkdir(parents=True, exist_ok=True)
    Path(env_json).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


def _members(work: Path, skip_png_in_runs: bool) -> list[Path]:
    files = []
    for path in sorted(work.rglob("*")):
        if not path.is_file() or path.name.endswith(SKIP_SUFFIXES) or "__pycache__" in path.parts:
            continue
        in_run = "stage1" in path.parts or "stage2" in path.parts
        if skip_png_in_runs and in_run and path.suffix == ".png":
            continue  # each run's own figures: regenerable from its history and metrics
        files.append(path)
    return files


def archive(work: str, out: str, name: str) -> Path:
    """One .tar.gz of work (no checkpoints, no cached features) in out, at most ARCHIVE_LIMIT bytes."""
    work_dir, out_dir = Path(work), Path(out)
    target = out_dir / name
    tmp = out_dir / (name + ".tmp")
    for skip_png in (False, True):
        with tarfile.open(tmp, "w:gz") as tar:
            for path in _members(work_dir, skip_png):
                tar.add(path, arcname=str(Path(work_dir.name) / path.relative_to(work_dir)))
        if tmp.stat().st_size <= ARCHIVE_LIMIT:
            break
        print(f"gpu_reference: {tmp.stat().st_size / 2**20:.1f} MiB is over the limit; leaving out the "
              "run directories' own PNGs")
    os.replace(tmp, target)
    size = target.stat().st_size
    if size > ARCHIVE_LIMIT:
        print(f"gpu_reference: WARNING {target} is {size / 2**20:.1f} MiB, over 16 MiB: it cannot come back")
    files = [p for p in out_dir.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        print(f"gpu_reference: WARNING {out_dir} holds {len(files)} files; only {MAX_FILES} come back")
    print(f"archive: {target} ({size / 2**20:.2f} MiB); {out_dir} holds {len(files)} files")
    return target


def main(argv: list[str]) -> int:
    """`prepare ROOT ENV_JSON [flags...]` or `archive WORK OUT NAME`."""
    if len(argv) >= 3 and argv[0] == "prepare":
        prepare(argv[1], argv[2], argv[3:])
        return 0
    if len(argv) == 4 and argv[0] == "archive":
        archive(argv[1], argv[2], argv[3])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
