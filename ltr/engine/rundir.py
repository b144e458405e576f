"""Run directories: atomic writes, checkpoints, the lock, config checks and history files."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import torch

from .. import __version__
from ..errors import LtrError


def git_commit() -> str:
    """The commit of the checkout this package runs from, or 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file by temp file + rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: object) -> None:
    """Atomic, indented JSON."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_torch(path: Path, obj: object) -> None:
    """Atomic torch.save."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load with weights_only=True and an error that says what is wrong."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise LtrError(f"{path} is corrupt or not an ltr checkpoint ({type(exc).__name__}); delete it to "
                       "retrain this run, or point to the right run directory") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise LtrError(f"{path} is not an ltr checkpoint (no 'model' entry)")
    return ckpt


def read_json(path: Path) -> dict:
    """Read a JSON file, with a clear error when it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise LtrError(f"{path} is not valid JSON ({exc}); delete the run directory") from None


class RunLock:
    """An O_EXCL lock file, so two processes never write one run directory."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False
        self.enabled = enabled  # under torchrun only rank 0 writes, so only rank 0 locks

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    raise LtrError(f"another process ({self.path.read_text().strip()}) is writing "
                                   f"{self.path.parent}; wait for it to finish or choose another "
                                   "--out") from None
                self.path.unlink(missing_ok=True)  # left by a process that died
                continue
            os.write(fd, me.encode())
            os.close(fd)
            self.held = True
            return self
        raise LtrError(f"could not lock {self.path.parent}")

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return True  # cannot check another machine: assume it is alive
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def runtime_info(device: torch.device, precision: str, compile: bool, root: str) -> dict:
    """The runtime section of config.json: device, precision, versions, where the data was."""
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # What --precision auto decides by: bf16 from compute capability 8.0, fp16 below it.
        "gpu_capability": (".".join(map(str, torch.cuda.get_device_capability(device)))
                           if device.type == "cuda" else None),
        "precision": precision,  # what the run trains in: bf16 | fp16 (with a GradScaler) | fp32
        "compile": compile,
        "root": str(root),
        # Where the data was, whatever the working directory: stage 2 finds it from here.
        "root_resolved": str(Path(root).resolve()),
        "ltr_version": __version__,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def claim_run_dir(out: Path, stage: str, config: dict) -> dict | None:
    """Check an existing run directory: finished -> its metrics; another config -> refuse."""
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = read_json(cfg_path)
        if old.get("stage") != stage:
            raise LtrError(f"{out} holds a {old.get('stage')} run, not a {stage} run; choose another --out")
        prev = old.get("config", {})
        diff = sorted(k for k in set(prev) | set(config) if prev.get(k) != config.get(k))
        if diff:
            detail = ", ".join(f"{k}: {prev.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise LtrError(f"{out} holds a run with a different config ({detail}); it is kept as it is. "
                           "Choose another --out, or delete that directory to redo it")
        if (out / "metrics.json").exists():
            return read_json(out / "metrics.json")
    return None


def write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    # The union of the rows' columns: a run resumed from an older checkpoint gains columns mid-way.
    fields = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())
