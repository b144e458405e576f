"""Re-balancing the classifier: MaxNorm and unit-norm projections, L2-/tau-norm, logit adjustment, LWS."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses import log_prior


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output row (class vector or conv filter)."""
    return weight.detach().flatten(1).float().norm(dim=1)


def maxnorm_threshold(weight: torch.Tensor, thresh: float = 0.1) -> float:
    """delta = min norm + thresh * (max norm - min norm), from the weights as they are now."""
    norms = row_norms(weight)
    lo, hi = float(norms.min()), float(norms.max())
    return lo + thresh * (hi - lo)


@torch.no_grad()
def project_max_norm(weight: torch.Tensor, delta: float | torch.Tensor) -> None:
    """Rescale, in place, every row whose norm exceeds delta to norm delta; others untouched."""
    norms = weight.flatten(1).norm(dim=1)
    # clamp(max=1) leaves rows at or below delta exactly as they are (scale 1.0).
    scale = (delta / norms.clamp_min(1e-12)).clamp(max=1.0)
    weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


@torch.no_grad()
def project_unit_norm(weight: torch.Tensor) -> None:
    """Rescale, in place, every row to unit norm."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    weight.div_(norms.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


@torch.no_grad()
def tau_normalize(weight: torch.Tensor, tau: float = 1.9) -> None:
    """Kang et al.'s tau-normalisation in place: w_c <- w_c / ||w_c|| ** tau."""
    norms = weight.flatten(1).norm(dim=1).clamp_min(1e-12)
    weight.div_(norms.pow(tau).view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


@torch.no_grad()
def l2_normalize(weight: torch.Tensor) -> None:
    """Post-hoc L2 normalisation in place: tau-norm with tau = 1."""
    tau_normalize(weight, 1.0)


@torch.no_grad()
def logit_adjust_bias(bias: torch.Tensor, counts: list[int], tau: float = 1.0) -> None:
    """Post-hoc logit adjustment (Menon et al.) in place: b_c <- b_c - tau * log p(c)."""
    bias.sub_(tau * log_prior(counts).to(bias))


@torch.no_grad()
def multiplicative_logit_adjust(fc: nn.Linear, counts: list[int], tau: float) -> None:
    """Multiplicative logit adjustment (Hasegawa & Sato) in place: z_c <- z_c / p(c) ** tau, p(c) = n_c / n.

    Row c of fc.weight and fc.bias[c] are both divided by p(c) ** tau, so every evaluation of fc (plain,
    flip-averaged, marginal likelihood) sees the adjusted logits. Meant for the unit-norm fixed-ETF rows of
    `--method etf-fr`; on any other classifier it is plain multiplicative adjustment.
    """
    prior = torch.as_tensor(counts, dtype=torch.float64)
    scale = (prior / prior.sum()).pow(-float(tau))
    fc.weight.mul_(scale.to(fc.weight).view(-1, 1))
    if fc.bias is not None:
        fc.bias.mul_(scale.to(fc.bias))


class ScaledLinear(nn.Module):
    """LWS (Kang et al.): a linear classifier whose logits are multiplied by a learnable per-class scale."""

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = fc.in_features, fc.out_features
        # The stage-1 parameters themselves (not copies): the caller freezes them, only `scale` learns.
        self.weight, self.bias = fc.weight, fc.bias
        self.scale = nn.Parameter(torch.ones(fc.out_features, device=fc.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled logits s_c * (w_c . x + b_c)."""
        return F.linear(x, self.weight, self.bias) * self.scale


def apply_posthoc(kind: str, fc: nn.Linear, counts: list[int], tau: float, la_tau: float) -> None:
    """Apply a post-hoc normaliser to a trained classifier in place (tau: tau-norm's / mla's exponent)."""
    if kind == "l2norm":
        l2_normalize(fc.weight)
    elif kind == "tau-norm":
        tau_normalize(fc.weight, tau)
    elif kind == "mla":
        multiplicative_logit_adjust(fc, counts, tau)
    else:
        # In the bias, so that every evaluation (plain, flip, marginal likelihood) sees it.
        logit_adjust_bias(fc.bias, counts, la_tau)
