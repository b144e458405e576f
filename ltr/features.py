"""Test-set features: the two views (plain and mirrored), their cache in a run directory, their analysis.

A frozen backbone's features never change, so every test evaluation of a classifier-only stage 2 (and of
the post-hoc normalisers) is one matrix product on cached features instead of a pass over 10,000 images.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .data import LTData, normalize
from .engine.precision import autocast, autocast_dtype
from .engine.rundir import save_torch
from .metrics import extract_features, feature_analysis, fisher_ratio

FEATURES_FILE = "test_features.pt"


@torch.no_grad()
def view_features(model: nn.Module, test_x: torch.Tensor, precision: str = "fp32",
                  batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Pooled features of the test images, plain and mirrored (eval mode, float32): one pass per view."""
    was_training = model.training
    model.eval()
    plain, mirror = [], []
    for start in range(0, len(test_x), batch_size):
        x = normalize(test_x[start : start + batch_size])
        with autocast(x.device.type, autocast_dtype(precision)):
            plain.append(model.features(x).float())
            mirror.append(model.features(torch.flip(x, dims=[3])).float())
    model.train(was_training)
    return {"plain": torch.cat(plain), "mirror": torch.cat(mirror)}


def save_test_features(run_dir: str | os.PathLike, feats: dict[str, torch.Tensor], precision: str) -> None:
    """Cache a stage-1 model's test features in its run directory (atomically; what test_features reads)."""
    cpu = {k: v.cpu() for k, v in feats.items()}
    save_torch(Path(run_dir) / FEATURES_FILE, {**cpu, "precision": precision})


def test_features(run_dir: str | os.PathLike, model: nn.Module, test_x: torch.Tensor,
                  precision: str = "fp32", batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Pooled test-set features of a finished stage-1 model, plain and mirrored; cached in its run dir.

    Stage 1 writes the cache when it finishes; runs without it (a committed reference run) get it here,
    in seconds. The cache records its precision; another precision computes (and caches) them again.
    Parallel stage-2 runs may write it at once: the file is replaced atomically.
    """
    path = Path(run_dir) / FEATURES_FILE
    if path.exists():
        try:
            cached = torch.load(path, map_location=test_x.device, weights_only=True)
            if (cached.get("precision", "fp32") == precision
                    and cached["plain"].shape[0] == len(test_x) == cached["mirror"].shape[0]):
                return {k: cached[k] for k in ("plain", "mirror")}
        except Exception:  # a damaged cache is only a cache: compute it again
            pass
    feats = view_features(model, test_x, precision, batch_size)
    save_test_features(run_dir, feats, precision)
    return feats


def feature_predictor(model: nn.Module, feats: dict[str, torch.Tensor]) -> Callable[[bool], torch.Tensor]:
    """predict(flip) -> test logits of model.fc on cached features (flip: mean with the mirror's)."""

    @torch.no_grad()
    def predict(flip: bool) -> torch.Tensor:
        logits = model.fc(feats["plain"]).float()
        return 0.5 * (logits + model.fc(feats["mirror"]).float()) if flip else logits

    return predict


def fisher_ratio_or_blank(feats: torch.Tensor, labels: torch.Tensor) -> float | str:
    """The Fisher ratio rounded for history.csv, or "" where it is undefined (a class with one sample)."""
    try:
        return round(fisher_ratio(feats, labels), 4)
    except ValueError:
        return ""


def stage1_feature_analysis(model: nn.Module, data: LTData, test_feats: torch.Tensor, test_y: torch.Tensor,
                            precision: str) -> dict:
    """Fisher ratio and cone effect of the (plain) test features and the un-augmented training features."""
    train_x = torch.as_tensor(data.train_x, device=test_y.device)
    train_y = torch.as_tensor(data.train_y, device=test_y.device)
    train_feats = extract_features(model, train_x, dtype=autocast_dtype(precision))
    out: dict = {}
    for split, (feats, y) in (("test", (test_feats, test_y)), ("train", (train_feats, train_y))):
        try:
            out[split] = feature_analysis(feats, y)
        except ValueError as exc:  # a class with one sample (tiny synthetic data): say why, no NaN
            out[split] = {"error": str(exc)}
    return out
