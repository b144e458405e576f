"""Data-parallel training under torchrun: one process a device, the global batch split across them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .data import LtrError


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True on the process that writes run directories (rank 0)."""
    return world()[0] == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def check_batch(batch_size: int) -> None:
    """The global batch must split evenly across the processes."""
    n = world()[1]
    if batch_size % n:
        raise LtrError(f"batch size {batch_size} does not split over {n} processes; use a multiple of {n}")


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of every rank's gradient, in one collective over a flat buffer (no host sync)."""
    n = world()[1]
    grads = [p.grad for p in params if p.grad is not None]
    if n == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_across(*tensors: torch.Tensor) -> None:
    """In-place sum of small tensors over all ranks (epoch totals)."""
    if world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if world()[1] > 1:
        dist.barrier()
