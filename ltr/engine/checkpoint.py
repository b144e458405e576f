"""The checkpointer: a run resumes exactly where it stopped, saves on a cadence, and obeys the time limit.

A checkpoint holds everything that decides the rest of the run (weights, optimizer momentum, the schedule,
the fp16 scaler, every loader's random state and the history), so a resumed run is bit-identical to one
that never stopped. Only rank 0 writes under torchrun; every write is atomic (engine/rundir.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import LtrError, TimeLimitReached
from . import dist
from .rundir import load_checkpoint, save_torch, write_history

DEADLINE_ENV = "LTR_DEADLINE"  # Unix time after which every run stops at its next epoch boundary
CHECKPOINT_FILE = "ckpt.pt"


def deadline() -> float | None:
    """The time limit of this process (Unix time, from LTR_DEADLINE), or None."""
    value = os.environ.get(DEADLINE_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise LtrError(f"{DEADLINE_ENV}={value!r} is not a Unix time in seconds; unset it") from None


def default_ckpt_every(device: torch.device) -> int:
    """Epochs between checkpoints: every epoch on CPU (minutes each), every 10 on CUDA (a ResNet-34
    checkpoint is about 170 MB and an epoch a few seconds); a time limit still saves where it stops."""
    return 10 if device.type == "cuda" else 1


class Checkpointer:
    """Saves and restores one run's training state in out/ckpt.pt, with out/history.csv beside it."""

    def __init__(self, out: Path, model: nn.Module, opt: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                 loaders: list, epochs: int, every: int, desc: str) -> None:
        self.out, self.path = out, out / CHECKPOINT_FILE
        self.model, self.opt, self.schedule, self.scaler, self.loaders = model, opt, schedule, scaler, loaders
        self.epochs, self.every, self.desc = epochs, every, desc
        # Ranks that disagreed about the clock would wait on each other forever: one process only.
        self.limit = deadline() if dist.world()[1] == 1 else None

    def resume(self) -> tuple[int, list[dict]]:
        """Load the checkpoint if there is one; (epochs already done, history so far)."""
        start, history = 0, []
        if self.path.exists():
            start, history = self._load()
        if self.limit is not None and start < self.epochs and time.time() >= self.limit:
            raise TimeLimitReached(f"time limit reached before {self.desc} started "
                                   f"(epoch {start}/{self.epochs}); rerun to go on")
        return start, history

    def _load(self) -> tuple[int, list[dict]]:
        ckpt = load_checkpoint(self.path, next(self.model.parameters()).device)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise LtrError(f"{self.path} does not fit this run's model ({str(exc).splitlines()[0]}); "
                           "delete it to retrain") from None
        kernel = {k: self.opt.param_groups[0].get(k) for k in ("fused", "foreach")}
        self.opt.load_state_dict(ckpt["optimizer"])
        for group in self.opt.param_groups:  # the kernel is this run's choice, not the checkpoint's
            group.update(kernel)
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        # Every loader's RNG state: each one's batch order (and augmentation) goes on where it stopped.
        rngs = ckpt.get("loader_rngs") or [ckpt["loader_rng"]]
        if len(rngs) != len(self.loaders):
            raise LtrError(f"{self.path} holds {len(rngs)} sampler states, this run has "
                           f"{len(self.loaders)}; delete it to retrain")
        for loader, state in zip(self.loaders, rngs, strict=True):
            loader.load_state_dict({"generator": state.cpu()})
        return int(ckpt["epoch"]), list(ckpt.get("history", []))

    def end_of_epoch(self, done: int, history: list[dict]) -> None:
        """Save when the cadence, the last epoch or the time limit says so; past the limit, stop the run."""
        out_of_time = self.limit is not None and done < self.epochs and time.time() >= self.limit
        if done % self.every == 0 or done == self.epochs or out_of_time:
            self.save(done, history)
        if out_of_time:
            raise TimeLimitReached(f"time limit reached: {self.desc} stopped after epoch "
                                   f"{done}/{self.epochs} with its checkpoint in {self.out}; rerun to resume")

    def save(self, epoch: int, history: list[dict]) -> None:
        """Write the checkpoint and history.csv atomically (rank 0 only under torchrun)."""
        if not dist.is_main():
            return
        save_torch(self.path, {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "loader_rngs": [loader.state_dict()["generator"] for loader in self.loaders],
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "history": history,
        })
        write_history(self.out / "history.csv", history)
