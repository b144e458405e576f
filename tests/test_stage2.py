"""Stage 2: losses, regularizers, and classifier retraining invariants on a smoke stage-1 run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import stop_stage1_after

from ltr.config import Stage1Config
from ltr.data import LtrError, load_cifar_lt
from ltr.losses import (
    balanced_softmax,
    class_balanced_ce,
    class_balanced_softmax_bce,
    class_balanced_weights,
    logit_adjusted_ce,
)
from ltr.regularizers import (
    l2_normalize,
    maxnorm_threshold,
    project_max_norm,
    project_unit_norm,
    tau_normalize,
)
from ltr.train import stage2_from, train_stage1, train_stage2

S1 = Stage1Config(dataset="cifar10", imbalance=10, model="resnet8", epochs=2, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def stage1(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("s1") / "run"
    train_stage1(S1, out, root=small_root, device="cpu", progress=False)
    return out


def _s2(stage1: Path, root: Path, out: Path, **kw: object) -> dict:
    cfg = stage2_from(stage1, "paper", epochs=kw.pop("epochs", 2), **kw)
    return train_stage2(cfg, out, root=root, device="cpu", progress=False)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "ckpt.pt", weights_only=True)["model"]


# ---------------------------------------------------------------- losses


def test_class_balanced_weights_hand_example() -> None:
    counts, beta = [100, 10, 1], 0.9
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    expect = [3 * r / sum(raw) for r in raw]
    got = class_balanced_weights(counts, beta)
    assert got.tolist() == pytest.approx(expect, rel=1e-6)
    assert float(got.sum()) == pytest.approx(3.0)
    assert got[2] > got[1] > got[0]


def test_cb_losses_match_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    w = class_balanced_weights([50, 20, 10, 5, 2])
    ce = -torch.log_softmax(logits, 1)[torch.arange(8), y]
    assert float(class_balanced_ce(logits, y, w)) == pytest.approx(float((w[y] * ce).mean()), rel=1e-6)
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(y, 5).float()
    bce = -(onehot * torch.log(p) + (1 - onehot) * torch.log(1 - p))
    expect = (w[y][:, None] * bce).mean()
    assert float(class_balanced_softmax_bce(logits, y, w)) == pytest.approx(float(expect), rel=1e-5)


def test_wb_loss_is_a_transcription_of_its_formula_value_and_gradient() -> None:
    """WB's CB loss against its formula written out: BCE(softmax, one-hot), weight w_y, mean over B x C."""
    g = torch.Generator().manual_seed(1)
    b, c = 16, 100
    logits = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, c, (b,), generator=g)
    w = class_balanced_weights(torch.randint(1, 500, (c,), generator=g).tolist())

    def transcribed(z: torch.Tensor) -> torch.Tensor:
        p = torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))
        t = torch.zeros(b, c, dtype=z.dtype)
        t[torch.arange(b), y] = 1.0
        per_entry = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
        return (w.double()[y][:, None] * per_entry).sum() / (b * c)

    ours_in = logits.float().clone().requires_grad_(True)
    ours = class_balanced_softmax_bce(ours_in, y, w)
    ours.backward()
    ref_in = logits.clone().requires_grad_(True)
    ref = transcribed(ref_in)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(ours_in.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-8)
    # The mean over the C columns makes its gradient about 1/C of the weighted cross-entropy's (SPEC 4).
    ce_in = logits.float().clone().requires_grad_(True)
    class_balanced_ce(ce_in, y, w).backward()
    ratio = float(ours_in.grad.norm() / ce_in.grad.norm())
    assert 0.5 / c < ratio < 2.0 / c


def test_logit_adjustment() -> None:
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    prior = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert float(logit_adjusted_ce(logits, y, prior, 0.0)) == pytest.approx(float(F.cross_entropy(logits, y)))
    assert float(balanced_softmax(logits, y, prior)) == pytest.approx(
        float(F.cross_entropy(logits + prior, y)))


# ---------------------------------------------------------------- regularizers


def test_maxnorm_projection_rows() -> None:
    w = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 2.0]])
    delta = maxnorm_threshold(w, 0.1)
    assert delta == pytest.approx(1.0 + 0.1 * (5.0 - 1.0))
    below = w[1].clone()
    project_max_norm(w, delta)
    assert w.norm(dim=1).tolist() == pytest.approx([delta, 1.0, delta])
    assert torch.equal(w[1], below)  # a row under the threshold is not touched


def test_tau_and_l2_norm_formulas() -> None:
    w = torch.randn(5, 7)
    n = w.norm(dim=1, keepdim=True)
    t = w.clone()
    tau_normalize(t, 1.9)
    assert torch.allclose(t, w / n**1.9)
    u = w.clone()
    l2_normalize(u)
    assert torch.allclose(u.norm(dim=1), torch.ones(5))
    v = w.clone()
    project_unit_norm(v)
    assert torch.allclose(u, v)


# ---------------------------------------------------------------- stage-2 runs


@pytest.mark.parametrize(("posthoc", "tau"), [("tau-norm", 1.9), ("l2norm", 1.0)])
def test_posthoc_changes_only_fc_weight(stage1: Path, small_root: Path, tmp_path: Path, posthoc: str,
                                        tau: float) -> None:
    m = _s2(stage1, small_root, tmp_path / posthoc, posthoc=posthoc, tau=1.9)
    before, after = _state(stage1), _state(tmp_path / posthoc)
    n = before["fc.weight"].norm(dim=1, keepdim=True)
    assert torch.allclose(after["fc.weight"], before["fc.weight"] / n**tau, atol=1e-6)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "fc.weight")
    assert m["epochs"] == 0 and m["posthoc"] == posthoc


def test_cb_wd_maxnorm_invariants(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    before = _state(stage1)
    delta = maxnorm_threshold(before["fc.weight"], 0.1)
    m = _s2(stage1, small_root, tmp_path / "max", loss="cb", wd=0.1, maxnorm=0.1)
    after = _state(tmp_path / "max")
    assert (after["fc.weight"].norm(dim=1) <= delta + 1e-6).all()
    assert m["maxnorm_thresholds"] == [pytest.approx(delta)]
    frozen = [k for k in before if not k.startswith("fc.")]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen), "frozen weights or BN buffers moved"
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_bn_train_reproduces_drift(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    _s2(stage1, small_root, tmp_path / "bn", loss="cb", bn="train", epochs=1)
    before, after = _state(stage1), _state(tmp_path / "bn")
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_official_fidelity_is_wbs_stage2(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    """One switch: epoch-stepped cosine (last epoch at lr 0), MaxNorm once per epoch, BN in train mode."""
    import json

    import pandas as pd

    from ltr.config import stage2_name

    epochs = 4
    cfg = stage2_from(stage1, "paper", loss="cb", wd=0.1, maxnorm=0.1, epochs=epochs, fidelity="official")
    assert (cfg.pgd_every, cfg.bn) == ("epoch", "train")
    assert stage2_name(cfg) == f"cb-official-wd0.1-max0.1-fidelity-official-e{epochs}-s0"
    out = tmp_path / "official"
    train_stage2(cfg, out, root=small_root, device="cpu", progress=False)
    lr = pd.read_csv(out / "history.csv")["lr"].tolist()
    # CosineAnnealingLR(T_max=epochs) stepped at the start of each epoch: epoch e runs at the rate for e + 1.
    expect = [0.01 * 0.5 * (1 + math.cos(math.pi * (e + 1) / epochs)) for e in range(epochs)]
    assert lr == pytest.approx(expect)
    assert lr[-1] == 0.0 and lr[0] < 0.01
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["fidelity"] == "official" and info["runtime"]["precision"] == "fp32"
    before, after = _state(stage1), _state(out)
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # BN in train mode
    delta = maxnorm_threshold(before["fc.weight"], 0.1)
    assert (after["fc.weight"].norm(dim=1) <= delta + 1e-6).all()  # projected after the last epoch


def test_resume_under_another_variant_or_fidelity_clashes(stage1: Path, small_root: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    _s2(stage1, small_root, out, loss="cb", epochs=1)
    for kw in ({"cb_variant": "standard"}, {"fidelity": "official"}):
        with pytest.raises(LtrError, match="different config"):
            _s2(stage1, small_root, out, loss="cb", epochs=1, **kw)
    # cb_variant does not change a CE run: a run made under the other default is reused, not refused.
    ce = tmp_path / "ce"
    first = _s2(stage1, small_root, ce, loss="ce", wd=0.1, epochs=1, cb_variant="standard")
    assert _s2(stage1, small_root, ce, loss="ce", wd=0.1, epochs=1) == first


@pytest.mark.parametrize(("flag", "value"), [("--cb-variant", "wb"), ("--fidelity", "paper")])
def test_bad_variant_or_fidelity_flag(stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flag: str,
                                      value: str) -> None:
    from ltr.cli import main

    for argv in (["stage2", "--from", str(stage1)], ["table1", "--preset", "tiny"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, flag, value, "--out", str(tmp_path / "o"), "--device", "cpu"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"invalid choice: '{value}'" in err and "official" in err and err.count("error") == 1
    assert not (tmp_path / "o").exists()


def test_weight_decay_lowers_classifier_norms(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    plain = _s2(stage1, small_root, tmp_path / "nowd", loss="cb")
    wd = _s2(stage1, small_root, tmp_path / "wd", loss="cb", wd=0.1)
    assert sum(wd["weight_norms"]) < sum(plain["weight_norms"])


def test_last_two_layers(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    _s2(stage1, small_root, tmp_path / "last2", loss="cb", wd=0.1, maxnorm=0.1, trainable="last2", epochs=1)
    before, after = _state(stage1), _state(tmp_path / "last2")
    key = "layer3.0.conv2.weight"  # resnet8: the last block's second conv
    assert not torch.equal(before[key], after[key])
    delta = maxnorm_threshold(before[key], 0.1)
    assert (after[key].flatten(1).norm(dim=1) <= delta + 1e-6).all()
    assert torch.equal(before["layer3.0.bn2.running_var"], after["layer3.0.bn2.running_var"])
    assert torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])


def test_unit_norm_retraining(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    m = _s2(stage1, small_root, tmp_path / "unit", unit_norm=True, epochs=1)
    assert all(math.isclose(n, 1.0, rel_tol=1e-5) for n in m["weight_norms"])


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"maxnorm": 0.0}, "maxnorm"), ({"maxnorm": 1.5}, "maxnorm"), ({"tau": -1.0}, "tau"),
     ({"posthoc": "l2norm", "wd": 0.1}, "--wd"), ({"loss": "focal"}, "loss"),
     ({"fidelity": "official", "pgd_every": "step"}, "one switch"), ({"fidelity": "x"}, "fidelity"),
     ({"posthoc": "l2norm", "fidelity": "official"}, "--fidelity official")],
)
def test_bad_stage2_config(stage1: Path, small_root: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(LtrError, match=match):
        _s2(stage1, small_root, tmp_path / "bad", **kw)


def test_from_missing_or_unfinished_run(small_root: Path, tmp_path: Path) -> None:
    with pytest.raises(LtrError, match="not a stage-1 run directory"):
        _s2(tmp_path / "nope", small_root, tmp_path / "o")
    part = tmp_path / "part"
    stop_stage1_after(1, S1, part, root=small_root, device="cpu", progress=False)
    with pytest.raises(LtrError, match="not finished"):
        _s2(part, small_root, tmp_path / "o2")


def test_class_count_mismatch(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    data = load_cifar_lt(small_root, "cifar100", 100)
    with pytest.raises(LtrError, match="10 classes but the data has 100"):
        train_stage2(stage2_from(stage1, "paper"), tmp_path / "m", data=data, device="cpu", progress=False)


def test_architecture_mismatch(stage1: Path, small_root: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(stage1, other)
    cfg = (other / "config.json").read_text().replace('"resnet8"', '"resnet32"')
    (other / "config.json").write_text(cfg)
    with pytest.raises(LtrError, match="does not match a resnet32"):
        _s2(other, small_root, tmp_path / "o")


# ---------------------------------------------------------------- where stage 2 finds its data


def test_stage2_reads_the_data_root_its_stage1_run_recorded(stage1: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    import json
    import shutil

    from ltr.cli import main

    monkeypatch.chdir(tmp_path)  # no data/ here: only the stage-1 run's config.json knows the root
    out = tmp_path / "s2"
    assert main(["stage2", "--from", str(stage1), "--out", str(out), "--loss", "cb", "--epochs", "3",
                 "--eval-every", "2", "--device", "cpu", "--quiet"]) == 0
    history = (out / "history.csv").read_text().splitlines()
    evaluated = [line.split(",")[4] != "" for line in history[1:]]
    assert evaluated == [False, True, True]  # --eval-every 2, and always the last epoch
    # The recorded root gone: one clear error that says where it looked and what to pass.
    moved = tmp_path / "moved"
    shutil.copytree(stage1, moved)
    info = json.loads((moved / "config.json").read_text())
    info["runtime"].update(root=str(tmp_path / "gone"), root_resolved=str(tmp_path / "gone"))
    (moved / "config.json").write_text(json.dumps(info))
    assert main(["stage2", "--from", str(moved), "--out", str(tmp_path / "o"), "--epochs", "1",
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "gone" in err and "--root" in err


def test_cached_test_features_give_the_full_forward_logits(stage1: Path, small_root: Path,
                                                           tmp_path: Path) -> None:
    from ltr.features import FEATURES_FILE, feature_predictor, test_features
    from ltr.metrics import predict_logits
    from ltr.train import load_stage1

    metrics = _s2(stage1, small_root, tmp_path / "cb", loss="cb", wd=0.1, maxnorm=0.1)
    assert (stage1 / FEATURES_FILE).is_file()  # written once, in the stage-1 run directory
    data = load_cifar_lt(small_root, "cifar10", 10)
    test_x = torch.as_tensor(data.test_x)
    model, _ = load_stage1(stage1, 10, "cpu")
    model.fc.load_state_dict({k[3:]: v for k, v in _state(tmp_path / "cb").items() if k.startswith("fc.")})
    predict = feature_predictor(model, test_features(stage1, model, test_x))
    for flip in (False, True):
        full = predict_logits(model, test_x, flip=flip)
        assert torch.allclose(predict(flip), full, atol=1e-4, rtol=1e-4)
    # metrics.json of the run equals an evaluation through the whole network.
    full_acc = predict_logits(model, test_x, flip=True).argmax(1).eq(torch.as_tensor(data.test_y))
    assert metrics["flip"]["all"] == pytest.approx(100 * full_acc.double().mean().item(), abs=1e-6)
