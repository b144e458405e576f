"""--precision: the auto choice per GPU generation (capability stubbed), fp16 + GradScaler trains on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import stop_stage1_after

from ltr.cli import main
from ltr.config import Stage1Config
from ltr.data import LtrError
from ltr.engine.precision import autocast_dtype, grad_scaler, resolve_precision
from ltr.train import train_stage1

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
TINY = dict(dataset="cifar10", imbalance=10, model="resnet8", epochs=2, batch_size=64, lr=0.05,
            eval_every=1)


def _gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str = "Stub GPU") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize(("capability", "gpu", "want"), [
    ((6, 0), "P100", "fp16"),
    ((7, 0), "V100", "fp16"),
    ((7, 5), "T4", "fp16"),
    ((8, 0), "A100", "bf16"),
    ((8, 6), "RTX 3090", "bf16"),
    ((8, 9), "L4 / RTX 4090", "bf16"),
    ((9, 0), "H100", "bf16"),
])
def test_auto_by_compute_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                    gpu: str, want: str) -> None:
    _gpu(monkeypatch, capability, gpu)
    assert resolve_precision("auto", CUDA) == want
    assert resolve_precision("auto", CUDA, "official") == "fp32"  # the official code trains in fp32
    assert resolve_precision("fp32", CUDA) == "fp32"


def test_auto_is_fp32_on_cpu_and_explicit_choices_are_kept() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    for p in ("bf16", "fp16", "fp32"):
        assert resolve_precision(p, CPU) == p
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("fp32") is None
    assert grad_scaler("fp16", CPU).is_enabled()
    assert not grad_scaler("bf16", CPU).is_enabled() and not grad_scaler("fp32", CPU).is_enabled()


def test_bad_or_contradictory_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LtrError, match="unknown --precision 'fp8'"):
        resolve_precision("fp8", CPU)
    with pytest.raises(LtrError, match="--fidelity official .* fp32; drop --precision bf16"):
        resolve_precision("bf16", CPU, "official")
    _gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.warns(UserWarning, match="Tesla T4 has no bf16 arithmetic"):
        assert resolve_precision("bf16", CUDA) == "bf16"  # honoured, but the user is told


def test_fp16_with_grad_scaler_trains_on_cpu(small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    m = train_stage1(Stage1Config(**TINY), out, root=small_root, device="cpu", precision="fp16",
                     progress=False)
    runtime = json.loads((out / "config.json").read_text())["runtime"]
    assert (runtime["precision"], runtime["precision_asked"]) == ("fp16", "fp16")
    assert m["precision"] == "fp16"
    assert m["plain"]["all"] > 20  # it learns (chance is 10%)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    scale = ckpt["scaler"]["scale"]
    assert 0 < scale <= 2.0**16  # the scaler ran (and may have backed off from its initial 2^16)
    hist = (out / "history.csv").read_text().splitlines()
    losses = [float(line.split(",")[2]) for line in hist[1:]]
    assert losses[-1] < losses[0]


def test_fp16_resume_restores_the_scaler(small_root: Path, tmp_path: Path) -> None:
    cfg = Stage1Config(**TINY)
    common = dict(root=small_root, device="cpu", precision="fp16", progress=False)
    train_stage1(cfg, tmp_path / "full", **common)
    assert stop_stage1_after(1, cfg, tmp_path / "resumed", **common) == 1
    train_stage1(cfg, tmp_path / "resumed", **common)
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"]


def test_auto_on_cpu_records_fp32_and_cli_flag(small_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    args = ["stage1", "--root", str(small_root), "--dataset", "cifar10", "--imbalance", "10", "--model",
            "resnet8", "--epochs", "1", "--device", "cpu", "--quiet", "--json"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    runtime = json.loads((tmp_path / "a" / "config.json").read_text())["runtime"]
    assert (runtime["precision"], runtime["precision_asked"]) == ("fp32", "auto")
    assert main([*args, "--fidelity", "official", "--precision", "fp16", "--out", str(tmp_path / "b")]) == 2
    assert "--fidelity official" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        main([*args, "--precision", "fp8"])
