"""Step functions: how one optimizer step turns its batches into a loss, for WB and the comparison methods."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .losses import cross_entropy

# One (images, labels) pair per loader of the job, drawn in lockstep.
Batches = tuple[tuple[torch.Tensor, torch.Tensor], ...]
StepOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# (model, batches, autocast) -> (loss, logits, targets); the logits and targets score training accuracy.
# Steps run their forward pass inside autocast() and their loss outside it (BCE refuses autocast).
StepFn = Callable[[nn.Module, Batches, Callable[[], AbstractContextManager]], StepOut]


def plain_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> StepFn:
    """WB's step: one batch through the whole model, one loss on its logits."""

    def step(model: nn.Module, batches: Batches, autocast: Callable[[], AbstractContextManager]) -> StepOut:
        ((x, y),) = batches
        with autocast():
            logits = model(x)
        return loss_fn(logits, y), logits, y

    return step


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


def aux_balanced_step(aux_weight: float, rotation: bool) -> StepFn:
    """CE of fc on the balanced batch + lambda * CE of the instance head on the instance batch (+ rot.)."""

    def step(model: nn.Module, batches: Batches, autocast: Callable[[], AbstractContextManager]) -> StepOut:
        (xb, yb), (xi, yi) = batches
        parts = [xb, xi]
        if rotation:
            xr, yr = rotations(xi)
            parts.append(xr)
        nb, ni = len(yb), len(yi)
        with autocast():
            # One pass of the shared backbone over all images (BN sees their union); each head reads
            # only the rows of its own batch, so it gets gradient from that batch alone.
            feats = model.features(torch.cat(parts))
            logits = model.fc(feats[:nb])
            aux = model.aux_heads["instance"](feats[nb : nb + ni])
            rot = model.aux_heads["rotation"](feats[nb + ni :]) if rotation else None
        loss = cross_entropy(logits, yb) + aux_weight * cross_entropy(aux, yi)
        if rot is not None:
            loss = loss + cross_entropy(rot, yr)
        return loss, logits, yb

    return step


def cosine_step(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> StepFn:
    """LDAM's step (Cao et al.): the loss sees cosines of normalised features and classifier rows."""

    def step(model: nn.Module, batches: Batches, autocast: Callable[[], AbstractContextManager]) -> StepOut:
        ((x, y),) = batches
        with autocast():
            feats = model.features(x)
        cos = F.normalize(feats.float(), dim=1) @ F.normalize(model.fc.weight.float(), dim=1).T
        return loss_fn(cos, y), cos, y

    return step
