"""Step functions: how one optimizer step turns its batches into a loss, for WB and the comparison methods."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .losses import cross_entropy

# One (images, labels) pair per loader of the job, drawn in lockstep.
Batches = tuple[tuple[torch.Tensor, torch.Tensor], ...]
# (loss, logits, targets); the logits and targets score training accuracy.
StepOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One optimizer step of a method: the images its forward pass takes, that pass, and the loss.

    The trainer runs `forward` as ONE call of a module (StepModule), so that DistributedDataParallel
    sees every parameter the pass uses and torch.compile captures all of it; the loss runs outside
    autocast (BCE refuses autocast) and may read the model (LDAM's cosines read fc's rows).
    """

    inputs: Callable[[Batches], tuple[torch.Tensor, ...]]  # batches -> the image tensors forward takes
    forward: Callable[..., Any]  # (model, *images) -> outputs; runs inside autocast
    loss: Callable[[nn.Module, Any, Batches], StepOut]  # (model, outputs, batches) -> loss, logits, y

    def __call__(self, model: nn.Module, batches: Batches,
                 autocast: Callable[[], AbstractContextManager]) -> StepOut:
        """The step on a bare model (single process, no compile): what the trainer computes."""
        with autocast():
            out = self.forward(model, *self.inputs(batches))
        return self.loss(model, out, batches)


class StepModule(nn.Module):
    """A step's forward pass as a module: what DistributedDataParallel wraps and torch.compile compiles."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.step_forward = forward

    def forward(self, *images: torch.Tensor) -> Any:
        return self.step_forward(self.model, *images)


def _images(batches: Batches) -> tuple[torch.Tensor]:
    return (batches[0][0],)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def plain_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Step:
    """WB's step: one batch through the whole model, one loss on its logits."""

    def loss(model: nn.Module, logits: torch.Tensor, batches: Batches) -> StepOut:
        y = batches[0][1]
        return loss_fn(logits, y), logits, y

    return Step(_images, _logits, loss)


# The auxiliary heads (SPEC 6, our reading) live in the model's state_dict under this prefix, so
# checkpoints and resume carry them; stage 2 and the metrics see the plain backbone and its head `fc`.
AUX_PREFIX = "aux_heads."
# The class-balanced sampler's seed is the run's seed plus this: its own stream, never the instance one's.
BALANCED_SEED_OFFSET = 1_000_003


def add_aux_heads(model: nn.Module, num_classes: int, ssl: str | None) -> nn.ModuleDict:
    """Attach the instance-batch head (and the 4-way rotation head) beside `fc`, as model.aux_heads."""
    dim = model.fc.in_features
    heads = {"instance": nn.Linear(dim, num_classes)}
    if ssl == "rotation":
        heads["rotation"] = nn.Linear(dim, 4)
    model.aux_heads = nn.ModuleDict(heads)
    return model.aux_heads


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i turned by (i mod 4) x 90 degrees counter-clockwise, and its label i mod 4."""
    # Labels by position, not by a draw: the instance batch is already in random order, the 4 angles are
    # exactly balanced in every batch, and no RNG state is consumed.
    out = x.clone()
    for k in (1, 2, 3):
        out[k::4] = torch.rot90(x[k::4], k, dims=(2, 3))
    return out, torch.arange(len(x), device=x.device) % 4


def _aux_inputs(rotation: bool) -> Callable[[Batches], tuple[torch.Tensor, ...]]:
    def inputs(batches: Batches) -> tuple[torch.Tensor, ...]:
        (xb, _), (xi, _) = batches
        return (xb, xi, rotations(xi)[0]) if rotation else (xb, xi)

    return inputs


def _aux_forward(model: nn.Module, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    nb, ni = len(parts[0]), len(parts[1])
    # One pass of the shared backbone over all images (BN sees their union); each head reads only the
    # rows of its own batch, so it gets gradient from that batch alone.
    feats = model.features(torch.cat(parts))
    logits = model.fc(feats[:nb])
    aux = model.aux_heads["instance"](feats[nb : nb + ni])
    if len(parts) == 2:
        return logits, aux
    return logits, aux, model.aux_heads["rotation"](feats[nb + ni :])


def aux_balanced_step(aux_weight: float, rotation: bool) -> Step:
    """CE of fc on the balanced batch + lambda * CE of the instance head on the instance batch (+ rot.)."""

    def loss(model: nn.Module, out: tuple[torch.Tensor, ...], batches: Batches) -> StepOut:
        (_, yb), (_, yi) = batches
        logits, aux = out[0], out[1]
        total = cross_entropy(logits, yb) + aux_weight * cross_entropy(aux, yi)
        if rotation:
            total = total + cross_entropy(out[2], torch.arange(len(yi), device=yi.device) % 4)
        return total, logits, yb

    return Step(_aux_inputs(rotation), _aux_forward, loss)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.features(x)


def cosine_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Step:
    """LDAM's step (Cao et al.): the loss sees cosines of normalised features and classifier rows."""

    def loss(model: nn.Module, feats: torch.Tensor, batches: Batches) -> StepOut:
        y = batches[0][1]
        cos = F.normalize(feats.float(), dim=1) @ F.normalize(model.fc.weight.float(), dim=1).T
        return loss_fn(cos, y), cos, y

    return Step(_images, _features, loss)


def _logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.features(x)
    return model.fc(feats), feats


def feature_regularized_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                             feature_reg: float) -> Step:
    """Hasegawa & Sato's step: CE of the logits + feature_reg * batch mean of ||f||^2 / 2.

    f is the pooled penultimate feature vector (what fc reads); its squared norm is taken in float32.
    """

    def loss(model: nn.Module, out: tuple[torch.Tensor, torch.Tensor], batches: Batches) -> StepOut:
        logits, feats = out
        y = batches[0][1]
        reg = feats.float().square().sum(1).mean() / 2
        return loss_fn(logits, y) + feature_reg * reg, logits, y

    return Step(_images, _logits_and_features, loss)
