"""Data parallel under torchrun (gloo, 2 CPU processes): shards, DistributedDataParallel, rank-0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ltr.data import DeviceLoader
from ltr.engine import dist
from ltr.engine.step import StepModule
from ltr.losses import cross_entropy
from ltr.methods import add_aux_heads, aux_balanced_step, plain_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NoBN(torch.nn.Module):
    """A backbone without batch norm (its statistics would be per process under gloo), with features/fc."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _train(method: str, rank: int = 0, world: int = 1) -> torch.nn.Module:
    """5 steps of a method through the trainer's pieces: its Step, StepModule, dist.data_parallel."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(40) % 5
    model = _NoBN()
    loaders = [DeviceLoader(x, y, 8, seed=1, shard=(rank, world))]
    step = plain_step(cross_entropy)
    if method == "aux-balanced":
        add_aux_heads(model, 5, None)
        loaders.insert(0, DeviceLoader(x, y, 8, seed=2, sampling="balanced", num_classes=5,
                                       shard=(rank, world)))
        step = aux_balanced_step(0.5, rotation=False)
    runner = dist.data_parallel(StepModule(model, step.forward), torch.device("cpu"))
    assert isinstance(runner, DistributedDataParallel) == (world > 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for batches in zip(*loaders, strict=True):
        opt.zero_grad()
        loss, _, _ = step.loss(model, runner(*step.inputs(batches)), batches)
        loss.backward()
        opt.step()
    return model


def _worker(rank: int, world: int, port: int, out: str, method: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init(torch.device("cpu"))
    model = _train(method, rank, world)
    if rank == 0:
        torch.save(model.state_dict(), out)
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("method", ["ce", "aux-balanced"])
def test_ddp_on_shards_equals_one_process(tmp_path: Path, method: str) -> None:
    """DistributedDataParallel over 2 processes, each on its shard, makes the single-process updates."""
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out), method), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    one = _train(method).state_dict()
    assert set(two) == set(one)  # aux-balanced: the instance head is synchronised too (one module call)
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, rtol=1e-5, atol=1e-6)


def test_average_gradients_is_gone() -> None:
    assert not hasattr(dist, "average_gradients")  # DDP averages; no hand-written all-reduce is left


def test_loader_shards_partition_the_global_batch() -> None:
    x = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(30)
    full = [b for _, b in DeviceLoader(x, y, 8, seed=2)]
    parts = [[b for _, b in DeviceLoader(x, y, 8, seed=2, shard=(r, 2))] for r in range(2)]
    for i, batch in enumerate(full):
        assert sorted(torch.cat([parts[0][i], parts[1][i]]).tolist()) == sorted(batch.tolist())


def test_torchrun_stage1_writes_from_rank0(small_root: Path, tmp_path: Path) -> None:
    args = ["--root", str(small_root), "--dataset", "cifar10", "--imbalance", "10", "--model", "resnet8",
            "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--device", "cpu", "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "ltr", "stage1", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"out"') == 1  # only rank 0 reports
    run = tmp_path / "two"
    assert {"config.json", "metrics.json", "ckpt.pt", "history.csv"} <= {p.name for p in run.iterdir()}
    assert not (run / ".lock").exists()
    assert json.loads((run / "config.json").read_text())["runtime"]["processes"] == 2
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "ltr", "stage1", *args, "--out", str(one)], check=True,
                   capture_output=True, env=env, timeout=300)
    a = torch.load(one / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(run / "ckpt.pt", weights_only=True)["model"]
    # Same global batches and averaged gradients; BN statistics are per process on CPU (no SyncBN under
    # gloo), so the weights agree only approximately: stated tolerance 10% relative after one epoch.
    for k in ("conv1.weight", "fc.weight"):
        assert float((a[k] - b[k]).norm() / a[k].norm()) < 0.10
