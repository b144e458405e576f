"""The methods as data: how a step turns its batches into a loss, which parameters learn, and the hooks
that run around the steps (projections, re-weighting), for WB and the comparison methods."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Stage1Config, Stage2Config
from .data import DeviceLoader, LTData
from .engine.step import Batches, StepOut
from .losses import class_balanced_weights, cross_entropy, make_loss
from .metrics import weight_norms
from .models import fix_etf_classifier
from .regularizers import ScaledLinear, maxnorm_threshold, project_max_norm, project_unit_norm


@dataclass(frozen=True)
class Step:
    """One optimizer step of a method: the images its forward pass takes, that pass, and the loss.

    The step runner (engine/step.py) runs `forward` as ONE call of a module, so that DistributedDataParallel
    sees every parameter the pass uses and torch.compile captures all of it; the loss runs outside
    autocast (BCE refuses autocast) and may read the model (LDAM's cosines read fc's rows).
    """

    inputs: Callable[[Batches], tuple[torch.Tensor, ...]]  # batches -> the image tensors forward takes
    forward: Callable[..., Any]  # (model, *images) -> outputs; runs inside autocast
    loss: Callable[[nn.Module, Any, Batches], StepOut]  # (model, outputs, batches) -> loss, logits, y


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


# The auxiliary heads (docs/recipe.md §6, our reading) live in the model's state_dict under this prefix, so
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


# ---------------------------------------------------------------- hooks


def _nothing(*_: object) -> None:
    """The default hook: nothing happens."""


@dataclass
class Hooks:
    """What a method does around the optimizer steps; every hook does nothing unless a method sets it."""

    before_epoch: Callable[[int], None] = _nothing  # gets the 0-based epoch (LDAM-DRW's re-weighting)
    after_step: Callable[[], None] = _nothing  # after every optimizer step (MaxNorm's projection)
    after_epoch: Callable[[], None] = _nothing  # after every epoch (MaxNorm, official fidelity)


# ---------------------------------------------------------------- stage 1: feature learning


def feature_learning_method(cfg: Stage1Config, model: nn.Module, data: LTData, device: torch.device,
                            shard: tuple[int, int] = (0, 1)) -> tuple[list[DeviceLoader], Step]:
    """The batch sources and the step of a stage-1 method (ce, aux-balanced, etf-fr) on model."""
    instance = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, device, seed=cfg.seed,
                            num_classes=data.num_classes, shard=shard)
    if cfg.method == "aux-balanced":
        # Built after the backbone, so its initial weights equal those of a CE run with this seed.
        add_aux_heads(model, data.num_classes, cfg.ssl)
        balanced = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, device,
                                seed=cfg.seed + BALANCED_SEED_OFFSET, sampling="balanced",
                                num_classes=data.num_classes, shard=shard)
        return [balanced, instance], aux_balanced_step(cfg.aux_weight, cfg.ssl == "rotation")
    if cfg.method == "etf-fr":
        # Hasegawa & Sato: a fixed simplex-ETF classifier (its own generator: the backbone's initial
        # weights equal those of a CE run with this seed), a learnable bias, feature regularisation.
        fix_etf_classifier(model, cfg.seed)
        return [instance], feature_regularized_step(make_loss("ce", data.counts, device), cfg.feature_reg)
    return [instance], plain_step(make_loss("ce", data.counts, device))


# ---------------------------------------------------------------- stage 2: classifier learning


@dataclass
class ClassifierMethod:
    """A stage-2 variant as data: what learns, the step, the hooks, and what metrics.json records."""

    params: list[nn.Parameter]  # what the optimizer updates
    step: Step  # batches -> loss
    hooks: Hooks = field(default_factory=Hooks)  # projections and re-weighting around the steps
    class_norms: Callable[[], torch.Tensor] | None = None  # per-class norms for history (None: fc's rows)
    report: dict = field(default_factory=dict)  # facts for metrics.json (thresholds, DRW epoch)
    report_at_end: Callable[[], dict] = dict  # facts only the trained model knows (LWS's scales)


def trainable_layers(model: nn.Module, which: str) -> list[nn.Module]:
    """The layers stage 2 retrains: fc, or (last2) the final conv and fc."""
    return [model.fc] if which == "fc" else [model.last_conv(), model.fc]


def classifier_method(cfg: Stage2Config, model: nn.Module, counts: list[int],
                      device: torch.device) -> ClassifierMethod:
    """The stage-2 variant cfg asks for, on model (frozen but for what the variant trains)."""
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    if cfg.reinit:
        # cRT (Kang et al.): a fresh classifier, drawn from the run's seed, retrained on balanced batches.
        model.fc.reset_parameters()
    layers = trainable_layers(model, cfg.trainable)
    params = [p for layer in layers for p in layer.parameters()]
    loss_fn = make_loss(cfg.loss, counts, device, cfg.cb_variant, cfg.cb_beta, cfg.la_tau)
    method = ClassifierMethod(params, plain_step(loss_fn))
    if cfg.lws:
        method = _learnable_weight_scaling(model, method.step)
    elif cfg.loss == "ldam-drw":
        method = _ldam_drw(cfg, model, counts, device, params, loss_fn)
    elif cfg.maxnorm is not None:
        method = _maxnorm(cfg, [layer.weight for layer in layers], method)
    elif cfg.unit_norm:
        project_unit_norm(model.fc.weight)
        method.hooks.after_step = lambda: project_unit_norm(model.fc.weight)
    method.report.setdefault("maxnorm_thresholds", [])
    for p in method.params:
        p.requires_grad_(True)
    return method


def _learnable_weight_scaling(model: nn.Module, step: Step) -> ClassifierMethod:
    """LWS (Kang et al.): only a scale per class learns; fc.weight and fc.bias stay bit for bit."""
    model.fc = ScaledLinear(model.fc)

    def class_norms() -> torch.Tensor:
        return model.fc.scale.detach().abs().float() * weight_norms(model)

    def report_at_end() -> dict:
        # The classifier that predicts is s_c * (w_c, b_c): its norms, and the scales themselves.
        return {"weight_norms": class_norms().cpu().tolist(),
                "lws_scales": model.fc.scale.detach().cpu().tolist()}

    return ClassifierMethod([model.fc.scale], step, class_norms=class_norms, report_at_end=report_at_end)


def _ldam_drw(cfg: Stage2Config, model: nn.Module, counts: list[int], device: torch.device,
              params: list[nn.Parameter], loss_fn: Any) -> ClassifierMethod:
    """LDAM-DRW (Cao et al.): a cosine classifier, plain LDAM, then class-balanced weights from mid-way."""
    # Cao et al.'s NormedLinear kept in fc as unit rows with a zero bias: fc's logits |f| cos then rank
    # classes as s cos does, so evaluation needs no special case.
    with torch.no_grad():
        model.fc.bias.zero_()
    project_unit_norm(model.fc.weight)
    # DRW: Cao et al. switch at epoch 160 of 200 end-to-end; stage 2 here switches half-way (6..10 of 10).
    drw_from = cfg.epochs // 2
    cb = class_balanced_weights(counts, cfg.cb_beta).to(device)

    def before_epoch(epoch: int) -> None:
        loss_fn.weight = cb if epoch >= drw_from else None

    hooks = Hooks(before_epoch=before_epoch, after_step=lambda: project_unit_norm(model.fc.weight))
    return ClassifierMethod([p for p in params if p is not model.fc.bias], cosine_step(loss_fn), hooks,
                            report={"drw_from_epoch": drw_from + 1})


def _maxnorm(cfg: Stage2Config, weights: list[torch.Tensor], method: ClassifierMethod) -> ClassifierMethod:
    """WB's MaxNorm: each trained layer's rows projected into a ball fixed from the stage-1 weights."""
    # One threshold per layer, computed once from the stage-1 weights (docs/recipe.md §4).
    thresholds = [maxnorm_threshold(w, cfg.maxnorm) for w in weights]

    def project() -> None:
        for w, delta in zip(weights, thresholds, strict=True):
            project_max_norm(w, delta)

    if cfg.pgd_every == "step":
        method.hooks.after_step = project
    else:  # fidelity "official": once per epoch, as WB's code does
        method.hooks.after_epoch = project
    method.report["maxnorm_thresholds"] = thresholds
    return method
