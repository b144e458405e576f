"""Feature analysis: Fisher discriminant ratio and cone effect against a direct numpy transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ltr.metrics import cone_effect, fisher_ratio


def _planted(seed: int, k: int = 5, d: int = 8, per_class: int = 30, spread: float = 3.0):
    """Class means `spread` apart in random directions, unit noise, and a common offset."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * spread + 4.0  # the offset makes every feature point one way (a cone)
    counts = rng.integers(2, per_class, size=k)
    x = np.concatenate([means[c] + rng.normal(size=(n, d)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return x, y


def _fdr_numpy(x: np.ndarray, y: np.ndarray) -> float:
    mu = x.mean(0)
    s_w = np.zeros((x.shape[1], x.shape[1]))
    s_b = np.zeros_like(s_w)
    for c in np.unique(y):
        xc = x[y == c]
        mc = xc.mean(0)
        s_w += (xc - mc).T @ (xc - mc)
        s_b += len(xc) * np.outer(mc - mu, mc - mu)
    return float(np.trace(np.linalg.pinv(s_w) @ s_b))


def _cone_numpy(x: np.ndarray, y: np.ndarray) -> dict:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    off = ~np.eye(len(x), dtype=bool)
    same = (y[:, None] == y[None, :]) & off
    diff = y[:, None] != y[None, :]
    return {"all": cos[off].mean(), "same": cos[same].mean(), "different": cos[diff].mean()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fisher_ratio_matches_transcription(seed: int) -> None:
    x, y = _planted(seed)
    got = fisher_ratio(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    assert got == pytest.approx(_fdr_numpy(x.astype(np.float32).astype(np.float64), y), rel=1e-6)


def test_fisher_ratio_grows_with_class_separation() -> None:
    near = fisher_ratio(*map(torch.tensor, _planted(0, spread=0.5)))
    far = fisher_ratio(*map(torch.tensor, _planted(0, spread=5.0)))
    assert far > 10 * near > 0


def test_fisher_ratio_survives_dead_units() -> None:
    x, y = _planted(3)
    x = np.concatenate([x, np.zeros((len(x), 3))], axis=1)  # three dead ReLU units: S_W is singular
    got = fisher_ratio(torch.tensor(x), torch.tensor(y))
    assert np.isfinite(got) and got == pytest.approx(_fdr_numpy(x, y), rel=1e-6)


def test_fisher_ratio_bad_input_names_the_problem() -> None:
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="two classes"):
        fisher_ratio(x, torch.zeros(10, dtype=torch.long))
    y = torch.tensor([0] * 9 + [1])
    with pytest.raises(ValueError, match="two samples per class"):
        fisher_ratio(x, y)
    with pytest.raises(ValueError, match="same n"):
        fisher_ratio(x, torch.zeros(9, dtype=torch.long))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cone_effect_matches_transcription(seed: int) -> None:
    x, y = _planted(seed)
    got = cone_effect(torch.tensor(x), torch.tensor(y))
    want = _cone_numpy(x, y)
    assert set(got) == {"all", "same", "different"}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12)
    assert got["same"] > got["different"]  # planted classes: same-class pairs point closer together


def test_cone_effect_sees_the_cone() -> None:
    x, y = _planted(0)
    centred = x - x.mean(0)  # removing the common direction opens the cone
    assert cone_effect(torch.tensor(x), torch.tensor(y))["all"] > 0.5
    assert abs(cone_effect(torch.tensor(centred), torch.tensor(y))["all"]) < 0.1


def test_cone_effect_one_class_and_singletons() -> None:
    x = torch.randn(6, 3)
    one = cone_effect(x, torch.zeros(6, dtype=torch.long))
    assert one["different"] is None and one["same"] == pytest.approx(one["all"])
    singles = cone_effect(x, torch.arange(6))
    assert singles["same"] is None and singles["different"] == pytest.approx(singles["all"])
    with pytest.raises(ValueError, match="two samples"):
        cone_effect(x[:1], torch.zeros(1, dtype=torch.long))
