"""Stage 1: the trainer learns, resumes bit-identically, writes its run directory, refuses bad input."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import stop_stage1_after

from ltr.config import Stage1Config, preset_config, run_name
from ltr.data import load_cifar_lt
from ltr.engine.rundir import RunLock
from ltr.errors import LtrError
from ltr.train import lr_factor, train_stage1

TINY = dict(dataset="cifar10", imbalance=10, model="resnet8", epochs=2, batch_size=64, lr=0.05,
            eval_every=1)


def _run(root: Path, out: Path, **kw: object) -> dict:
    cfg = Stage1Config(**{**TINY, **kw})
    return train_stage1(cfg, out, root=root, device="cpu", progress=False)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "ckpt.pt", weights_only=True)["model"]


def test_smoke_run_learns_and_writes_run_dir(small_root: Path, tmp_path: Path) -> None:
    cfg = preset_config("stage1", "smoke")
    out = tmp_path / run_name(cfg)
    m = train_stage1(cfg, out, root=small_root, device="cpu", progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "history.csv", "metrics.json", "ckpt.pt"}
    assert m["plain"]["all"] > 20  # chance is 1%
    assert m["synthetic_data"] is True
    assert m["plain"]["many"] > 80
    for key in ("plain", "flip"):
        assert set(m[key]) == {"all", "many", "medium", "few"}
    assert len(m["per_class_acc"]) == len(m["weight_norms"]) == len(m["marginal_likelihood"]) == 100
    assert math.isclose(sum(m["marginal_likelihood"]), 1.0, rel_tol=1e-4)
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["config"]["seed"] == 0 and cfg_json["runtime"]["ltr_version"]
    assert "git_commit" in cfg_json["runtime"]
    hist = (out / "history.csv").read_text().splitlines()
    assert len(hist) == 1 + cfg.epochs and "wn_99" in hist[0]
    assert not (out / ".lock").exists()


def test_kill_and_resume_is_bit_identical(small_root: Path, tmp_path: Path) -> None:
    _run(small_root, tmp_path / "full")
    cfg = Stage1Config(**TINY)
    part = stop_stage1_after(1, cfg, tmp_path / "resumed", root=small_root, device="cpu", progress=False)
    assert part == 1
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 1
    train_stage1(cfg, tmp_path / "resumed", root=small_root, device="cpu", progress=False)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "history.csv").read_text().count("\n") == 3


def test_same_seed_same_weights_and_finished_run_not_redone(small_root: Path, tmp_path: Path) -> None:
    _run(small_root, tmp_path / "a", epochs=1)
    _run(small_root, tmp_path / "b", epochs=1)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    stamp = os.stat(tmp_path / "a" / "ckpt.pt").st_mtime_ns
    again = _run(small_root, tmp_path / "a", epochs=1)
    assert os.stat(tmp_path / "a" / "ckpt.pt").st_mtime_ns == stamp
    assert again == json.loads((tmp_path / "a" / "metrics.json").read_text())


def test_weight_decay_shrinks_norms(small_root: Path, tmp_path: Path) -> None:
    naive = _run(small_root, tmp_path / "wd0", wd=0.0, epochs=3)
    tuned = _run(small_root, tmp_path / "wd", wd=5e-3, epochs=3)
    n0, n1 = torch.tensor(naive["weight_norms"]), torch.tensor(tuned["weight_norms"])
    assert n1.mean() < n0.mean()


def test_official_schedule_differs_as_spec_says() -> None:
    spe, epochs = 10, 4
    ours = [lr_factor(s, spe, epochs) for s in range(spe * epochs)]
    off = [lr_factor(s, spe, epochs, "official") for s in range(spe * epochs)]
    assert ours[0] == 1.0 and ours[1] < 1.0  # per-step cosine from the full rate
    assert off[0] == off[spe - 1] == pytest.approx(0.5 * (1 + math.cos(math.pi / epochs)))
    assert off[-1] == pytest.approx(0.0, abs=1e-12)  # the last epoch runs at zero
    assert len(set(off)) == epochs


def test_official_fidelity_recorded(small_root: Path, tmp_path: Path) -> None:
    _run(small_root, tmp_path / "off", fidelity="official", epochs=1)
    cfg = json.loads((tmp_path / "off" / "config.json").read_text())
    assert cfg["config"]["fidelity"] == "official" and cfg["runtime"]["precision"] == "fp32"


def test_refuses_other_config_in_out(small_root: Path, tmp_path: Path) -> None:
    _run(small_root, tmp_path / "r", epochs=1)
    before = (tmp_path / "r" / "metrics.json").read_text()
    with pytest.raises(LtrError, match=r"wd: 0\.005 -> 0\.0"):
        _run(small_root, tmp_path / "r", epochs=1, wd=0.0)
    assert (tmp_path / "r" / "metrics.json").read_text() == before


def test_lock_stops_second_writer(small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    with RunLock(out), pytest.raises(LtrError, match="another process"):
        _run(small_root, out, epochs=1)
    # a lock left by a dead process is taken over
    (out / ".lock").write_text(f"{os.uname().nodename} 999999999")
    _run(small_root, out, epochs=1)


def test_nan_loss_keeps_last_good_checkpoint(small_root: Path, tmp_path: Path) -> None:
    cfg = Stage1Config(**{**TINY, "epochs": 3})
    out = tmp_path / "nan"
    stop_stage1_after(1, cfg, out, root=small_root, device="cpu", progress=False)
    good = _weights(out)
    # Poison the saved classifier: the resumed epoch's loss is NaN without changing the config.
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model"]["fc.weight"] = torch.full_like(ckpt["model"]["fc.weight"], float("nan"))
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(LtrError, match=r"epoch 2.*lower --lr"):
        train_stage1(cfg, out, root=small_root, device="cpu", progress=False)
    kept = torch.load(out / "ckpt.pt", weights_only=True)
    assert kept["epoch"] == 1 and not (out / "metrics.json").exists()
    assert torch.equal(kept["model"]["layer1.0.conv1.weight"], good["layer1.0.conv1.weight"])


def test_diverging_lr_is_reported(small_root: Path, tmp_path: Path) -> None:
    with pytest.raises(LtrError, match="lower --lr"):
        _run(small_root, tmp_path / "big", lr=1e12, epochs=1)


def test_corrupt_checkpoint(small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "corrupt"
    cfg = Stage1Config(**TINY)
    stop_stage1_after(1, cfg, out, root=small_root, device="cpu", progress=False)
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LtrError, match="corrupt"):
        train_stage1(cfg, out, root=small_root, device="cpu", progress=False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("model", "vgg", "resnet34"), ("dataset", "mnist", "cifar100"), ("fidelity", "x", "official"),
     ("imbalance", 0.5, "imbalance")],
)
def test_bad_stage1_config(small_root: Path, tmp_path: Path, field: str, value: object, match: str) -> None:
    with pytest.raises(LtrError, match=match):
        train_stage1(replace(Stage1Config(**TINY), **{field: value}), tmp_path / "x", root=small_root,
                     device="cpu", progress=False)


def test_data_passed_in_is_used(small_root: Path, tmp_path: Path) -> None:
    data = load_cifar_lt(small_root, "cifar10", 10)
    cfg = Stage1Config(**{**TINY, "epochs": 1})
    m = train_stage1(cfg, tmp_path / "d", root="/nonexistent", data=data, device="cpu", progress=False)
    assert m["counts"] == data.counts


def test_compiled_training_compiles_once_over_three_epochs(small_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The last, smaller batch of each epoch runs uncompiled: one graph for all 3 epochs, no recompiles."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # a backend that counts the graphs it is given and runs them as they are
    real_compile, calls = torch.compile, []

    def counting_compile(model, **kwargs):
        calls.append(kwargs)
        return real_compile(model, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    cfg = Stage1Config(**{**TINY, "epochs": 3})
    n = len(load_cifar_lt(small_root, cfg.dataset, cfg.imbalance).train_y)
    assert n % cfg.batch_size  # every epoch ends with a smaller batch
    m = train_stage1(cfg, tmp_path / "c", root=small_root, device="cpu", progress=False, compile=True)
    assert calls == [{"dynamic": False}]
    assert counter.frame_count == 1  # compiled once, for the full batch, and never again
    assert json.loads((tmp_path / "c" / "config.json").read_text())["runtime"]["compile"] is True
    assert m["plain"]["all"] > 20


def test_stage1_records_feature_analysis_and_flip_history(small_root: Path, tmp_path: Path) -> None:
    m = _run(small_root, tmp_path / "run")
    feats = m["features"]
    for split in ("test", "train"):
        assert feats[split]["fdr"] > 0
        assert set(feats[split]["cone"]) == {"all", "same", "different"}
        assert feats[split]["cone"]["same"] > feats[split]["cone"]["different"]  # learnable colours
    import pandas as pd

    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert {"test_acc", "test_acc_flip", "test_fdr"} <= set(hist.columns)
    assert hist["test_fdr"].notna().all() and (hist["test_fdr"] > 0).all()
    assert hist["test_acc_flip"].iloc[-1] == pytest.approx(m["flip"]["all"], abs=1e-3)


def test_compile_failure_falls_back_to_eager_with_one_warning(small_root: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step that raises (lazily, as inductor does) is a warning; the run trains on eagerly."""

    class Broken(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: object) -> object:
            raise RuntimeError("inductor exploded")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: Broken(module))
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*inductor exploded") as caught:
        m = train_stage1(
            Stage1Config(**TINY), tmp_path / "c", root=small_root, device="cpu", progress=False,
            compile=True, compile_mode="reduce-overhead")
    assert len([w for w in caught if "torch.compile failed" in str(w.message)]) == 1
    assert m["compile_error"] == "RuntimeError: inductor exploded"
    assert m["plain"]["all"] > 1  # it trained

    def refuses(module: torch.nn.Module, **kw: object) -> torch.nn.Module:
        raise RuntimeError("no compiler for this Python")

    monkeypatch.setattr(torch, "compile", refuses)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        m = train_stage1(Stage1Config(**{**TINY, "epochs": 1}), tmp_path / "r", root=small_root, device="cpu",
                         progress=False, compile=True)
    assert m["compile_error"]


def test_time_limit_stops_at_an_epoch_boundary_and_resumes(small_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Past LTR_DEADLINE a run checkpoints after its epoch and raises; without it the run resumes."""
    import types

    import ltr.engine.checkpoint as checkpoint
    from ltr.errors import TimeLimitReached

    clock = iter([0.0, 200.0])  # the start check passes, the end of epoch 1 is past the limit
    fake = types.SimpleNamespace(time=lambda: next(clock))
    monkeypatch.setattr(checkpoint, "time", fake)
    monkeypatch.setenv(checkpoint.DEADLINE_ENV, "100")
    cfg = Stage1Config(**TINY)
    out = tmp_path / "cut"
    with pytest.raises(TimeLimitReached, match="after epoch 1/2"):
        train_stage1(cfg, out, root=small_root, device="cpu", progress=False, ckpt_every=10)
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 1  # saved although ckpt_every=10
    assert not (out / "metrics.json").exists()
    with pytest.raises(TimeLimitReached, match="before stage1"):  # still past it: nothing starts
        monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(time=lambda: 300.0))
        train_stage1(cfg, out, root=small_root, device="cpu", progress=False)
    monkeypatch.delenv(checkpoint.DEADLINE_ENV)
    m = train_stage1(cfg, out, root=small_root, device="cpu", progress=False)
    assert m["epochs"] == 2
    assert (out / "history.csv").read_text().count("\n") == 3  # header + epochs 1 and 2, none twice


def test_ctrl_c_says_one_line_and_the_same_command_resumes(small_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C in epoch 2: exit code 130, one line naming the epoch, no traceback; the rerun finishes."""
    import ltr.train as train
    from ltr.cli import main

    real_means, calls = train.EpochTotals.means, []

    def interrupted_in_epoch_2(self: train.EpochTotals) -> tuple[float, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_means(self)

    monkeypatch.setattr(train.EpochTotals, "means", interrupted_in_epoch_2)
    out = tmp_path / "ctrl-c"
    argv = ["stage1", "--root", str(small_root), "--device", "cpu", "--quiet", "--out", str(out),
            "--preset", "smoke", "--dataset", "cifar10", "--imbalance", "10", "--model", "resnet8",
            "--epochs", "2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip() == "ltr stage1: interrupted at epoch 2; run the same command to resume"
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 1
    assert main(argv) == 0 and (out / "metrics.json").exists()
