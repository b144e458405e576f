"""Hasegawa & Sato's one-stage recipe: the fixed simplex-ETF classifier, feature regularisation
(`--method etf-fr`), multiplicative logit adjustment (`--posthoc mla`) and its tau sweep (`mla-tau`)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ltr import notebook_tools, plots
from ltr.cli import main
from ltr.config import DEFAULTS_OF_ADDED_FIELDS, MLA_TAU, Stage1Config, run_name
from ltr.data import LtrError, load_cifar_lt
from ltr.engine.step import StepRunner
from ltr.experiments.sweep import run_sweep
from ltr.methods import feature_regularized_step
from ltr.models import build_model, simplex_etf
from ltr.regularizers import multiplicative_logit_adjust
from ltr.train import load_stage1, stage2_from, train_stage1, train_stage2

# cifar10 at IF 10 on the small synthetic files: 10 classes, 64-d ResNet-8 features (d >= K - 1).
ETF = Stage1Config(dataset="cifar10", imbalance=10, model="resnet8", method="etf-fr", epochs=1,
                   batch_size=128, lr=0.05, wd=5e-3)


@pytest.fixture(scope="module")
def etf_run(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("etf") / run_name(ETF)
    train_stage1(ETF, out, root=small_root, device="cpu", progress=False)
    return out


def _cosines(w: torch.Tensor) -> torch.Tensor:
    g = w.double() @ w.double().T
    return g[~torch.eye(len(w), dtype=torch.bool)]


# ---------------------------------------------------------------- the classifier


@pytest.mark.parametrize(("k", "d"), [(10, 64), (10, 9), (100, 512)])
def test_simplex_etf_is_exact_when_the_features_have_room(k: int, d: int) -> None:
    w = simplex_etf(k, d, seed=3)
    assert w.shape == (k, d) and w.dtype == torch.float32
    assert torch.allclose(w.norm(dim=1), torch.ones(k), atol=1e-6)
    # Every pair at cosine -1/(K-1): the simplex ETF, rotated into feature space.
    want = torch.full((k * (k - 1),), -1 / (k - 1), dtype=torch.float64)
    assert torch.allclose(_cosines(w), want, atol=1e-6)
    assert torch.equal(w, simplex_etf(k, d, seed=3)) and not torch.equal(w, simplex_etf(k, d, seed=4))


def test_simplex_etf_below_k_minus_1_dims_is_a_renormalised_projection() -> None:
    k, d = 100, 64  # ResNet-8 / ResNet-32 on CIFAR-100: no exact simplex fits
    w = simplex_etf(k, d, seed=0).double()
    assert torch.allclose(w.norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    assert torch.linalg.matrix_rank(w) == d
    cos = _cosines(w)
    assert cos.std() > 1e-3  # not equal any more ...
    assert abs(float(cos.mean()) + 1 / (k - 1)) < 5e-3  # ... but spread around the simplex's cosine
    # As documented: the rows are those of the simplex projected onto a d-dim subspace of its span, so with
    # positive weights (their norms before renormalising) they sum to zero: 0 lies inside their hull.
    weights = torch.linalg.lstsq(w[1:].T, -w[0])[0]
    assert torch.allclose(w[1:].T @ weights, -w[0], atol=1e-6)


def test_feature_regularized_loss() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    # The trainer's own step runner: forward, loss and backward, as one training step computes them.
    runner = StepRunner(model, feature_regularized_step(F.cross_entropy, 0.01), torch.device("cpu"))
    loss, logits, yy = runner.forward_backward(((x, y),))
    f = model.features(x)
    want = F.cross_entropy(model.fc(f), y) + 0.01 * (f * f).sum(1).mean() / 2
    assert torch.allclose(loss, want) and torch.equal(yy, y) and logits.shape == (6, 10)


# ---------------------------------------------------------------- the stage-1 run


def test_etf_fr_run(etf_run: Path) -> None:
    assert "etf-fr" in etf_run.name
    state = torch.load(etf_run / "ckpt.pt", weights_only=True)["model"]
    # The ETF is fixed: training left it bit for bit as drawn from the seed; the bias trained (from zero).
    assert torch.equal(state["fc.weight"], simplex_etf(10, 64, ETF.seed))
    assert state["fc.bias"].abs().max() > 0
    m = json.loads((etf_run / "metrics.json").read_text())
    assert m["method"] == "etf-fr"
    assert np.allclose(m["weight_norms"], 1.0, atol=1e-5)
    assert np.isfinite(m["features"]["test"]["fdr"]) and set(m["features"]["test"]["cone"]) == {
        "all", "same", "different"}
    hist = pd.read_csv(etf_run / "history.csv")
    assert {"test_fdr", "test_acc_flip"} <= set(hist.columns) and hist["test_fdr"].notna().all()
    # load_stage1 rebuilds the fixed classifier from the checkpoint.
    model, cfg = load_stage1(etf_run)
    assert cfg.method == "etf-fr" and cfg.feature_reg == 0.01
    assert torch.equal(model.fc.weight.detach(), state["fc.weight"]) and not model.fc.weight.requires_grad
    assert etf_run / "feature_analysis.png" in plots.run_figures(etf_run)
    assert (etf_run / "feature_analysis.png").stat().st_size > 1000


def test_etf_backbone_starts_where_a_ce_run_starts(small_root: Path) -> None:
    data = load_cifar_lt(small_root, "cifar10", 10)
    torch.manual_seed(0)
    ce = build_model("resnet8", data.num_classes)
    torch.manual_seed(0)
    etf = build_model("resnet8", data.num_classes)
    from ltr.models import fix_etf_classifier

    fix_etf_classifier(etf, 0)
    torch.manual_seed(0)  # the ETF's draws did not touch the global stream
    assert torch.equal(ce.layer1[0].conv1.weight, etf.layer1[0].conv1.weight)
    assert torch.equal(etf.fc.bias, torch.zeros(10)) and not etf.fc.weight.requires_grad


def test_old_run_dirs_without_feature_reg_still_match(etf_run: Path, small_root: Path,
                                                     tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(etf_run, old)
    info = json.loads((old / "config.json").read_text())
    assert info["config"]["feature_reg"] == DEFAULTS_OF_ADDED_FIELDS["feature_reg"]
    info["config"].pop("feature_reg")
    (old / "config.json").write_text(json.dumps(info))
    assert train_stage1(ETF, old, root=small_root, device="cpu", progress=False) == json.loads(
        (old / "metrics.json").read_text())
    with pytest.raises(LtrError, match="feature_reg"):
        train_stage1(replace(ETF, feature_reg=0.1), old, root=small_root, device="cpu", progress=False)


# ---------------------------------------------------------------- multiplicative logit adjustment


def test_mla_divides_every_logit_by_the_prior_to_the_tau() -> None:
    torch.manual_seed(0)
    fc = torch.nn.Linear(8, 4)
    counts = [40, 20, 10, 5]
    x = torch.randn(5, 8)
    before = fc(x).double()
    multiplicative_logit_adjust(fc, counts, 0.65)
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    assert torch.allclose(fc(x).double(), before / prior**0.65, rtol=1e-5, atol=1e-6)


def test_posthoc_mla_run(etf_run: Path, small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mla"
    m = train_stage2(stage2_from(etf_run, "tiny", posthoc="mla", tau=0.65), out, root=small_root,
                     device="cpu", progress=False)
    s1 = torch.load(etf_run / "ckpt.pt", weights_only=True)["model"]
    s2 = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    counts = torch.tensor(m["counts"], dtype=torch.float64)
    scale = ((counts / counts.sum()) ** -0.65).float()
    assert torch.allclose(s2["fc.weight"], s1["fc.weight"] * scale[:, None])
    assert torch.allclose(s2["fc.bias"], s1["fc.bias"] * scale)
    # The ETF's unit rows become prior^-tau: the adjustment is the norms.
    assert np.allclose(m["weight_norms"], scale.numpy(), rtol=1e-5)
    assert plots.run_label(out).endswith("+ multiplicative logit adjustment (tau=0.65)")
    assert plots.table1_row(out) is None


def test_cli_one_stage(etf_run: Path, small_root: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture) -> None:
    # --posthoc mla without --tau takes Hasegawa & Sato's 0.65, not tau-norm's 1.9.
    out = tmp_path / "cli-mla"
    assert main(["stage2", "--from", str(etf_run), "--posthoc", "mla", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    assert json.loads((out / "config.json").read_text())["config"]["tau"] == MLA_TAU
    capsys.readouterr()
    assert main(["stage1", "--method", "nope", "--root", str(small_root), "--out", str(tmp_path / "x")]) == 2
    assert "etf-fr" in capsys.readouterr().err
    assert main(["stage2", "--from", str(etf_run), "--posthoc", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "mla" in capsys.readouterr().err
    z = str(tmp_path / "z")
    assert main(["stage1", "--feature-reg", "0.1", "--root", str(small_root), "--out", z]) == 2
    assert "--method etf-fr" in capsys.readouterr().err


def test_mla_tau_sweep(etf_run: Path, small_root: Path, tmp_path: Path) -> None:
    files = run_sweep("mla-tau", values=[0.0, MLA_TAU, 1.5], root=small_root, out=tmp_path / "exp",
                      preset="tiny", dataset="cifar10", imbalance=10, from_run=etf_run, device="cpu",
                      progress=False, figures=False)
    info = json.loads(files["sweep.json"].read_text())
    assert info["field"] == "tau" and info["paper"] == MLA_TAU and info["chosen"] in (0.0, MLA_TAU, 1.5)
    assert "Hasegawa & Sato's value: tau = 0.65" in files["sweep.md"].read_text()
    assert len(pd.read_csv(files["sweep.csv"])) == 3


def test_logit_rescaling_of_mla_recovers_its_tau(etf_run: Path, small_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mla"
    train_stage2(stage2_from(etf_run, "tiny", posthoc="mla", tau=0.4), out, root=small_root, device="cpu",
                 progress=False)
    df = notebook_tools.logit_rescaling(etf_run, out)
    assert np.allclose(df["cosine"], 1.0) and abs(df.attrs["tau_fit"] - 0.4) < 1e-4
    assert (df["bias_after"] * df["bias_before"] >= 0).all()
    assert notebook_tools.plot_logit_rescaling(df).get_axes()


def test_tuned_mla_tau_applies_to_the_one_stage_row(tmp_path: Path) -> None:
    from ltr.engine.rundir import write_json
    from ltr.experiments.tables import ONE_STAGE_ROW, TABLE1_ROWS, tune_rows
    from ltr.experiments.tuning import read_tuned, tuned_header

    write_json(tmp_path / "sweep.json", {"kind": "mla-tau", "preset": "cpu", "dataset": "cifar100",
                                         "imbalance": 100.0, "chosen": 0.4, "preset_value": MLA_TAU})
    chosen = read_tuned([tmp_path], "cpu", "cifar100", [100.0])
    rows = tune_rows((*TABLE1_ROWS, ONE_STAGE_ROW), {k: v for k, (v, _, _) in chosen.items()})
    header = tuned_header(chosen, "cpu")
    assert rows[-1].stage2 == {"posthoc": "mla", "tau": 0.4} and rows[:-1] == TABLE1_ROWS
    assert "Hasegawa & Sato: 0.65" in header
