"""Losses: cross-entropy, class-balanced (effective number), logit-adjusted, balanced softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import LtrError


def class_balanced_weights(counts: list[int] | torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al. weights (1 - beta) / (1 - beta ** n_c), scaled to sum to the number of classes."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if (n <= 0).any():
        raise LtrError("class-balanced weights need every class to have at least one image")
    w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    return (w / w.sum() * len(n)).float()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy, averaged over the batch."""
    return F.cross_entropy(logits.float(), targets)


def class_balanced_ce(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy with per-sample weight w_y, averaged over the batch (not over the weights)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (weights[targets] * ce).mean()


def class_balanced_softmax_bce(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The official code's variant: binary cross-entropy on softmax probabilities, weight w_y."""
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(targets, probs.shape[1]).float()
    w = weights[targets].unsqueeze(1).expand_as(probs)
    return F.binary_cross_entropy(probs, onehot, weight=w)


def logit_adjusted_ce(
    logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Menon et al.'s logit-adjusted loss: CE on logits + tau * log prior."""
    return F.cross_entropy(logits.float() + tau * log_prior, targets)


def balanced_softmax(
    logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor
) -> torch.Tensor:
    """Ren et al.'s balanced softmax: logit adjustment with tau = 1."""
    return logit_adjusted_ce(logits, targets, log_prior, 1.0)


def make_loss(
    name: str,
    counts: list[int],
    device: torch.device,
    cb_variant: str = "standard",
    beta: float = 0.9999,
):
    """A loss function (logits, targets) -> scalar, by name: 'ce' or 'cb'."""
    if name == "ce":
        return cross_entropy
    if name == "cb":
        w = class_balanced_weights(counts, beta).to(device)
        if cb_variant == "standard":
            return lambda logits, y: class_balanced_ce(logits, y, w)
        if cb_variant == "official":
            return lambda logits, y: class_balanced_softmax_bce(logits, y, w)
        raise LtrError(f"unknown cb variant {cb_variant!r}; use 'standard' or 'official'")
    raise LtrError(f"unknown loss {name!r}; use 'ce' or 'cb'")
