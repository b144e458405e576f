"""The comparison rows: aux-balanced (our reading of Zhang et al.), cRT, LWS, logit adjustment, balanced
softmax, LDAM-DRW, and the `compare` table built from their run directories."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import stop_stage1_after

from ltr.cli import main
from ltr.config import Stage1Config, run_name
from ltr.data import LtrError, load_cifar_lt
from ltr.engine.step import StepRunner
from ltr.experiments.compare import COMPARE_ROWS, OUR_IMPLEMENTATION, run_compare
from ltr.experiments.report import PAPER_PEERS, PAPER_TABLE1
from ltr.experiments.tables import ONE_STAGE_ROW
from ltr.losses import LDAMLoss, class_balanced_weights, ldam_margins, log_prior, make_loss
from ltr.methods import add_aux_heads, aux_balanced_step, rotations
from ltr.models import build_model
from ltr.plots import plot_group_summary
from ltr.train import stage2_from, train_stage1, train_stage2

S1 = Stage1Config(dataset="cifar10", imbalance=10, model="resnet8", epochs=1, batch_size=128, lr=0.05)
RUN_FILES = {"config.json", "metrics.json", "ckpt.pt", "history.csv"}


@pytest.fixture(scope="module")
def stage1(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s1") / "run"
    train_stage1(S1, out, root=small_root, device="cpu", progress=False)
    return out


def _s2(stage1: Path, root: Path, out: Path, **kw: object) -> dict:
    cfg = stage2_from(stage1, "tiny", **{"batch_size": 128, **kw})
    return train_stage2(cfg, out, root=root, device="cpu", progress=False)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "ckpt.pt", weights_only=True)["model"]


# ---------------------------------------------------------------- aux-balanced


def _grads(model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(names)}


def test_each_head_learns_from_its_own_batch_only() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    add_aux_heads(model, 10, "rotation")
    model.train()
    g = torch.Generator().manual_seed(1)
    xb, xi = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    yb, yi = torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g)
    # The trainer's own step runner: forward, loss and backward, as one training step computes them.
    runner = StepRunner(model, aux_balanced_step(0.7, rotation=True), torch.device("cpu"))
    heads = ("fc.", "aux_heads.")

    def run(yb: torch.Tensor, yi: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss, logits, y = runner.forward_backward(((xb, yb), (xi, yi)))
        assert torch.equal(y, yb) and logits.shape == (8, 10)  # predictions come from the main head
        return _grads(model, heads)

    got = run(yb, yi)
    # By construction: each head's gradient is that of its own loss on its own rows of the features.
    feats = model.features(torch.cat([xb, xi, rotations(xi)[0]])).detach()
    h = model.aux_heads
    want = {
        "fc": torch.autograd.grad(F.cross_entropy(model.fc(feats[:8]), yb), list(model.fc.parameters())),
        "aux_heads.instance": torch.autograd.grad(
            0.7 * F.cross_entropy(h["instance"](feats[8:16]), yi), list(h["instance"].parameters())),
        "aux_heads.rotation": torch.autograd.grad(
            F.cross_entropy(h["rotation"](feats[16:]), torch.arange(8) % 4),
            list(h["rotation"].parameters())),
    }
    for prefix, (gw, gb) in want.items():
        assert torch.allclose(got[f"{prefix}.weight"], gw, atol=1e-6)
        assert torch.allclose(got[f"{prefix}.bias"], gb, atol=1e-6)
    # Other labels on one batch move only the head that reads that batch.
    other_i = run(yb, (yi + 1) % 10)
    assert torch.equal(other_i["fc.weight"], got["fc.weight"])
    assert not torch.equal(other_i["aux_heads.instance.weight"], got["aux_heads.instance.weight"])
    other_b = run((yb + 1) % 10, yi)
    assert not torch.equal(other_b["fc.weight"], got["fc.weight"])
    assert torch.equal(other_b["aux_heads.instance.weight"], got["aux_heads.instance.weight"])
    assert torch.equal(other_b["aux_heads.rotation.weight"], got["aux_heads.rotation.weight"])


def test_rotation_labels_for_all_four_angles() -> None:
    x = torch.zeros(8, 3, 4, 4)
    x[:, :, 0, 0] = 1.0  # a mark in the top-left corner
    out, labels = rotations(x)
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # Counter-clockwise quarter turns carry the top-left corner to bottom-left, bottom-right, top-right.
    corner = {0: (0, 0), 1: (3, 0), 2: (3, 3), 3: (0, 3)}
    for i in range(8):
        k = int(labels[i])
        assert out[i, :, corner[k][0], corner[k][1]].eq(1).all() and out[i].sum() == 3
        assert torch.equal(torch.rot90(out[i], -k, dims=(1, 2)), x[i])
    ramp = torch.arange(16.0).view(1, 1, 4, 4).expand(4, 3, 4, 4)
    turned, _ = rotations(ramp)
    assert torch.equal(turned[1, 0], torch.rot90(ramp[1, 0], 1)) and not torch.equal(turned[1], ramp[1])


def test_aux_balanced_resume_is_bit_identical(small_root: Path, tmp_path: Path) -> None:
    assert "-aux-balanced0.5-rotation-" in run_name(replace(S1, method="aux-balanced", ssl="rotation",
                                                            aux_weight=0.5))
    cfg = replace(S1, method="aux-balanced", aux_weight=0.5, epochs=2, batch_size=64)
    full_data = load_cifar_lt(small_root, "cifar10", 10)
    keep = slice(None, None, 4)  # a quarter of the images keeps this test fast; the trainer does not care
    data = replace(full_data, train_x=full_data.train_x[keep], train_y=full_data.train_y[keep],
                   counts=np.bincount(full_data.train_y[keep], minlength=10).tolist())
    kw = dict(data=data, device="cpu", progress=False)
    full = train_stage1(cfg, tmp_path / "full", **kw)
    assert stop_stage1_after(1, cfg, tmp_path / "res", **kw) == 1
    ckpt = torch.load(tmp_path / "res" / "ckpt.pt", weights_only=True)
    assert len(ckpt["loader_rngs"]) == 2  # the balanced and the instance sampler
    resumed = train_stage1(cfg, tmp_path / "res", **kw)
    a, b = _state(tmp_path / "full"), _state(tmp_path / "res")
    assert "aux_heads.instance.weight" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["plain"] == resumed["plain"] and full["method"] == "aux-balanced"
    assert (tmp_path / "full" / "history.csv").read_text().count("\n") == 3
    # Stage 2 starts from its backbone and main head; the auxiliary heads stay behind.
    m = train_stage2(stage2_from(tmp_path / "full", "tiny", loss="cb"), tmp_path / "s2", **kw)
    assert not any(k.startswith("aux_heads.") for k in _state(tmp_path / "s2")) and m["epochs"] == 1


# ---------------------------------------------------------------- baselines


def test_lws_changes_only_the_scales(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    m = _s2(stage1, small_root, tmp_path / "lws", lws=True, sampling="balanced")
    before, after = _state(stage1), _state(tmp_path / "lws")
    assert set(after) == set(before) | {"fc.scale"}
    assert all(torch.equal(before[k], after[k]) for k in before), "LWS moved a frozen tensor"
    scale = after["fc.scale"]
    assert not torch.equal(scale, torch.ones_like(scale))
    assert m["lws_scales"] == pytest.approx(scale.tolist())
    norms = scale.abs() * before["fc.weight"].norm(dim=1)  # the predicting classifier is s_c * w_c
    assert m["weight_norms"] == pytest.approx(norms.tolist(), rel=1e-5)


def test_logit_adjustment_tau0_is_plain_ce_and_bs_is_tau1() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    counts = [100, 40, 20, 5, 1]
    la0 = make_loss("la", counts, torch.device("cpu"), tau=0.0)
    assert float(la0(logits, y)) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
    prior = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts)).float()
    assert torch.allclose(log_prior(counts), prior)
    la1, bs = make_loss("la", counts, torch.device("cpu")), make_loss("bs", counts, torch.device("cpu"))
    assert float(la1(logits, y)) == float(bs(logits, y))
    assert float(bs(logits, y)) == pytest.approx(float(F.cross_entropy(logits + prior, y)), rel=1e-6)


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_posthoc_logit_adjustment_moves_only_the_bias(stage1: Path, small_root: Path, tmp_path: Path,
                                                      tau: float) -> None:
    m = _s2(stage1, small_root, tmp_path / "la", posthoc="logit-adjust", la_tau=tau)
    before, after = _state(stage1), _state(tmp_path / "la")
    expect = before["fc.bias"] - tau * log_prior(m["counts"])
    assert torch.allclose(after["fc.bias"], expect, atol=1e-6)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "fc.bias")
    if tau == 0:
        assert m["plain"] == json.loads((stage1 / "metrics.json").read_text())["plain"]
    assert m["epochs"] == 0 and m["posthoc"] == "logit-adjust"


def test_ldam_margins_and_loss() -> None:
    counts = [256, 81, 16, 1]
    m = ldam_margins(counts)
    assert float(m.max()) == pytest.approx(0.5) and int(m.argmax()) == 3
    assert m.tolist() == pytest.approx([0.5 * n ** -0.25 for n in counts], rel=1e-6)  # n^(-1/4), max 0.5
    assert m.tolist() == pytest.approx([0.125, 0.5 / 3, 0.25, 0.5], rel=1e-6)
    loss = LDAMLoss(counts, torch.device("cpu"))
    cos = torch.tensor([[0.9, 0.1, -0.2, 0.3], [0.2, 0.1, 0.4, 0.8]])
    y = torch.tensor([0, 3])
    shifted = cos.clone()
    shifted[0, 0] -= 0.125
    shifted[1, 3] -= 0.5
    assert float(loss(cos, y)) == pytest.approx(float(F.cross_entropy(30 * shifted, y)), rel=1e-6)
    loss.weight = class_balanced_weights(counts)
    w = loss.weight[y]
    per = F.cross_entropy(30 * shifted, y, reduction="none")
    assert float(loss(cos, y)) == pytest.approx(float((w * per).sum() / w.sum()), rel=1e-6)


def test_ldam_drw_run(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    m = _s2(stage1, small_root, tmp_path / "ldam", loss="ldam-drw", epochs=2)
    after = _state(tmp_path / "ldam")
    assert torch.allclose(after["fc.weight"].norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.equal(after["fc.bias"], torch.zeros(10))
    assert m["drw_from_epoch"] == 2 and m["loss"] == "ldam-drw"  # second half of 2 epochs
    assert m["weight_norms"] == pytest.approx([1.0] * 10, rel=1e-5)


def test_crt_reinitialises_the_classifier(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    _s2(stage1, small_root, tmp_path / "crt0", sampling="balanced", reinit=True, epochs=0)
    before, fresh = _state(stage1), _state(tmp_path / "crt0")
    assert not torch.equal(before["fc.weight"], fresh["fc.weight"])
    assert all(torch.equal(before[k], fresh[k]) for k in before if not k.startswith("fc."))
    torch.manual_seed(S1.seed)
    assert torch.equal(fresh["fc.weight"], torch.nn.Linear(64, 10).weight.detach())


RECIPES = {
    "crt": {"sampling": "balanced", "reinit": True},
    "lws": {"sampling": "balanced", "lws": True},
    "la-posthoc": {"posthoc": "logit-adjust"},
    "la-loss": {"loss": "la", "la_tau": 0.5},
    "bs": {"loss": "bs"},
    "ldam-drw": {"loss": "ldam-drw"},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_baseline_writes_a_run_directory(stage1: Path, small_root: Path, tmp_path: Path,
                                              name: str) -> None:
    out = tmp_path / name
    m = _s2(stage1, small_root, out, **RECIPES[name])
    files = {p.name for p in out.iterdir()}
    # A post-hoc adjustment trains no epoch, so it has no history (as tau-norm).
    assert files >= (RUN_FILES - {"history.csv"} if name == "la-posthoc" else RUN_FILES)
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert {k: cfg[k] for k in RECIPES[name]} == RECIPES[name]
    assert set(m["plain"]) == {"all", "many", "medium", "few"} and len(m["per_class_acc"]) == 10
    assert all(math.isfinite(v) for v in m["weight_norms"])


def test_aux_balanced_cli_run_dir(small_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "aux"
    assert main(["stage1", "--root", str(small_root), "--preset", "tiny", "--dataset", "cifar10",
                 "--imbalance", "10", "--method", "aux-balanced", "--out", str(out), "--device", "cpu",
                 "--quiet", "--json"]) == 0
    assert {p.name for p in out.iterdir()} >= RUN_FILES | {"weight_norms.png"}
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["method"], cfg["aux_weight"], cfg["ssl"]) == ("aux-balanced", 1.0, None)
    assert json.loads(capsys.readouterr().out)["plain"]["all"] >= 0


def test_stage2_cli_shorthands(stage1: Path, small_root: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    base = ["stage2", "--from", str(stage1), "--root", str(small_root), "--preset", "tiny", "--epochs", "0",
            "--device", "cpu", "--quiet"]
    assert main(base + ["--crt", "--out", str(tmp_path / "crt")]) == 0
    cfg = json.loads((tmp_path / "crt" / "config.json").read_text())["config"]
    assert (cfg["sampling"], cfg["reinit"], cfg["lws"]) == ("balanced", True, False)
    assert main(base + ["--lws", "--out", str(tmp_path / "lws")]) == 0
    cfg = json.loads((tmp_path / "lws" / "config.json").read_text())["config"]
    assert (cfg["sampling"], cfg["lws"]) == ("balanced", True)
    assert main(base + ["--crt", "--sampling", "instance", "--out", str(tmp_path / "x")]) == 2
    assert "--crt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"lws": True, "maxnorm": 0.1}, "--lws cannot"), ({"loss": "ldam-drw", "unit_norm": True}, "ldam"),
     ({"la_tau": 2.0}, "--la-tau"), ({"posthoc": "logit-adjust", "lws": True}, "--lws"),
     ({"lws": True, "reinit": True}, "--reinit"), ({"la_tau": -1.0, "loss": "la"}, "--la-tau")],
)
def test_bad_baseline_config(stage1: Path, small_root: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(LtrError, match=match):
        _s2(stage1, small_root, tmp_path / "bad", **kw)


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"method": "ldam"}, "aux-balanced"), ({"ssl": "rotation"}, "--ssl"),
     ({"method": "aux-balanced", "ssl": "jigsaw"}, "rotation"),
     ({"method": "aux-balanced", "aux_weight": -1.0}, "--aux-weight")],
)
def test_bad_aux_config(small_root: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(LtrError, match=match):
        train_stage1(replace(S1, **kw), tmp_path / "x", root=small_root, device="cpu", progress=False)


def test_run_dirs_from_before_the_new_fields_still_match(stage1: Path, small_root: Path,
                                                        tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(stage1, old)
    path = old / "config.json"
    info = json.loads(path.read_text())
    assert info["config"]["aux_weight"] == 1.0  # new runs record every field
    for key in ("aux_weight", "ssl"):
        info["config"].pop(key)
    path.write_text(json.dumps(info))
    again = train_stage1(S1, old, root=small_root, device="cpu", progress=False)
    assert again == json.loads((old / "metrics.json").read_text())
    with pytest.raises(LtrError, match="aux_weight"):  # a value other than the default still differs
        train_stage1(replace(S1, method="aux-balanced", aux_weight=2.0), old, root=small_root, device="cpu",
                     progress=False)


# ---------------------------------------------------------------- the table


def test_compare_tiny_table(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--root", str(tiny_root), "--preset", "tiny", "--seeds", "0", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    df = pd.read_csv(out / "compare.csv")
    flip = df[df.tta == "flip"].set_index("row")
    assert list(flip.index) == [r.name for r in COMPARE_ROWS]
    assert flip.all_mean.notna().all() and (flip.seeds == 1).all()
    assert flip.loc["+ LDAM-DRW", "peer_all"] == PAPER_PEERS["LDAM-DRW"]
    assert flip.loc["WD=0 (w/ CE)", "peer_all"] == PAPER_PEERS["CE"]
    assert flip.loc["+ CB & WD & Max", "all_paper"] == PAPER_TABLE1["+ CB & WD & Max"][3]
    assert flip.loc["aux-balanced (our reading)", "published"] == "our reading, no published number"
    # Hasegawa & Sato's one-stage row: our implementation, on the WD row's backbone, no published number.
    one = flip.loc[ONE_STAGE_ROW.name]
    assert one.published == OUR_IMPLEMENTATION and one.stage1.startswith("fixed ETF + feature reg., WD=")
    assert one.stage1.endswith(flip.loc["WD tuned (w/ CE)", "stage1"].split("WD=")[1])
    assert json.loads(one.stage2) == {"posthoc": "mla", "tau": 0.65}
    runs = json.loads((out / "compare_runs.json").read_text())["runs"]
    mla = next(Path(r["dir"]) for r in runs if r["row"] == ONE_STAGE_ROW.name)
    assert mla.name == "mla0.65" and "etf-fr" in mla.parent.name
    s1 = json.loads((out / "stage1" / mla.parent.name / "metrics.json").read_text())
    assert "fdr" in s1["features"]["test"]  # the cifar100 (K = 100 > 64-d features) ETF run analysed
    md = (out / "compare.md").read_text()
    assert "not the paper's recipe" in md and "our reading, no published number" in md
    # Every number in the published column is one the sources give: none is made up.
    quoted = {f"{v:.2f}" for v in PAPER_PEERS.values()} | {f"{r[3]:.2f}" for r in PAPER_TABLE1.values()}
    for cell in flip.published:
        assert set(re.findall(r"\d+\.\d\d", cell)) <= quoted
    for f in ("group_accuracy.png", "weight_norms.png", "norm_evolution_aux-balanced.png",
              "norm_evolution_etf-fr.png", "feature_analysis.png"):
        assert (out / "figures-compare" / f).stat().st_size > 1000
    assert "published All" in capsys.readouterr().out
    # A second call finds every run finished and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("ckpt.pt")}
    run_compare(root=tiny_root, out=out, preset="tiny", seeds=[0], device="cpu", progress=False,
                figures=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("ckpt.pt")} == stamps and len(stamps) == 13
    assert (out / "compare_groups.png").stat().st_size > 5000
    fig = plot_group_summary(out / "compare.csv", tta="plain")
    assert len(fig.axes) == 4 and len(fig.axes[0].patches) == len(COMPARE_ROWS)
    with pytest.raises(LtrError, match="missing"):
        plot_group_summary(df.drop(columns=["few_std"]))
    # --tuned: a sweep's validation-chosen tau replaces WB's 1.9 in the tau-norm row only.
    sweep = tmp_path / "sweep-tau"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({
        "kind": "tau", "preset": "tiny", "dataset": "cifar100", "imbalance": 100.0, "chosen": 0.6,
        "preset_value": 1.9, "heldout_chosen": None, "heldout_paper": None}))
    assert main(["compare", "--root", str(tiny_root), "--preset", "tiny", "--seeds", "0", "--out", str(out),
                 "--device", "cpu", "--quiet", "--no-figures", "--tuned", str(sweep)]) == 0
    tuned = json.loads((out / "compare-tuned_runs.json").read_text())
    dirs = {r["row"]: r["dir"] for r in tuned["runs"]}
    assert dirs["+ tau-norm"].endswith("tau-norm0.6")
    plain_dirs = {r["row"]: r["dir"] for r in json.loads((out / "compare_runs.json").read_text())["runs"]}
    assert dirs["+ LWS"] == plain_dirs["+ LWS"] and dirs["+ tau-norm"] != plain_dirs["+ tau-norm"]
    tuned_md = (out / "compare-tuned.md").read_text()
    assert "Tuned on validation" in tuned_md and "||w_c||^0.6" in tuned_md and "||w_c||^1.9" in md
    assert (out / "compare.md").read_text() == md  # the WB-valued table is left as it was
