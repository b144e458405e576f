"""Backbones: parameter counts, features/fc, last conv."""

from __future__ import annotations

import pytest
import torch

from ltr.data import LtrError
from ltr.models import build_model, count_parameters


@pytest.mark.parametrize(("name", "params", "dim"), [("resnet34", 21.3e6, 512), ("resnet32", 0.47e6, 64)])
def test_parameter_counts_and_features(name: str, params: float, dim: int) -> None:
    model = build_model(name, 100)
    assert abs(count_parameters(model) - params) / params < 0.01
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x)
    assert feats.shape == (2, dim)
    assert torch.allclose(model(x), model.fc(feats))
    assert model.fc.weight.shape == (100, dim) and model.fc.bias is not None
    assert model.last_conv().weight.shape[0] == dim


def test_unknown_model() -> None:
    with pytest.raises(LtrError, match="resnet34"):
        build_model("vgg", 10)
