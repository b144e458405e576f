"""Data-parallel training under torchrun: one process a device, the global batch split across them, DDP."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import LtrError


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


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """module wrapped in DistributedDataParallel under torchrun (each gradient bucket all-reduced as soon
    as the backward pass has produced it, overlapping communication); the module itself in one process."""
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: gradients live in the communication buckets, no copy between them and .grad.
    # broadcast_buffers=False: every rank computes the same BN statistics (SyncBatchNorm on CUDA) or keeps
    # its own (gloo); re-broadcasting rank 0's buffers before every forward would only add a collective.
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, broadcast_buffers=False)


def sum_across(*tensors: torch.Tensor) -> None:
    """In-place sum of small tensors over all ranks (epoch totals)."""
    if world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)


def barrier() -> None:
    """Wait for every rank (no-op outside torchrun)."""
    if world()[1] > 1:
        dist.barrier()
