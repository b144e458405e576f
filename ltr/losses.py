"""Losses: cross-entropy, class-balanced (effective number), logit-adjusted, balanced softmax, LDAM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LtrError


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


def class_balanced_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with per-sample weight w_y, averaged over the batch (not over the weights)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return (weights[targets] * ce).mean()


def class_balanced_softmax_bce(logits: torch.Tensor, targets: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """The official code's variant: binary cross-entropy on softmax probabilities, weight w_y."""
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(targets, probs.shape[1]).float()
    w = weights[targets].unsqueeze(1).expand_as(probs)
    return F.binary_cross_entropy(probs, onehot, weight=w)


def logit_adjusted_ce(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor,
                      tau: float = 1.0) -> torch.Tensor:
    """Menon et al.'s logit-adjusted loss: CE on logits + tau * log prior."""
    return F.cross_entropy(logits.float() + tau * log_prior, targets)


def balanced_softmax(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Ren et al.'s balanced softmax: logit adjustment with tau = 1."""
    return logit_adjusted_ce(logits, targets, log_prior, 1.0)


def log_prior(counts: list[int] | torch.Tensor) -> torch.Tensor:
    """log p(y) of the training set: log(n_c / sum n)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    return torch.log(n / n.sum()).float()


def ldam_margins(counts: list[int] | torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """Cao et al.'s per-class margins m_c proportional to n_c ** (-1/4), the largest equal to max_margin."""
    m = torch.as_tensor(counts, dtype=torch.float64).pow(-0.25)
    return (m * (max_margin / m.max())).float()


class LDAMLoss:
    """LDAM (Cao et al. 2019) on cosine logits: subtract m_y from the true class, scale by s, weighted CE."""

    def __init__(self, counts: list[int], device: torch.device, max_margin: float = 0.5,
                 scale: float = 30.0) -> None:
        self.margins = ldam_margins(counts, max_margin).to(device)
        self.scale = float(scale)
        # None = unweighted; deferred re-weighting (DRW) sets class-balanced weights partway through.
        self.weight: torch.Tensor | None = None

    def __call__(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of cosine similarities (batch x classes, in [-1, 1]) against targets."""
        cos = cosine.float()
        shifted = cos.scatter_add(1, targets[:, None], -self.margins[targets][:, None])
        # As Cao et al.'s code: F.cross_entropy's `weight` averages over the weights of the batch.
        return F.cross_entropy(self.scale * shifted, targets, weight=self.weight)


def make_loss(name: str, counts: list[int], device: torch.device, cb_variant: str = "official",
              beta: float = 0.9999, tau: float = 1.0):
    """A loss (logits, targets) -> scalar by name: ce, cb, la (tau), bs, ldam-drw (on cosine logits)."""
    if name == "ce":
        return cross_entropy
    if name == "cb":
        w = class_balanced_weights(counts, beta).to(device)
        if cb_variant == "standard":
            return lambda logits, y: class_balanced_ce(logits, y, w)
        if cb_variant == "official":
            return lambda logits, y: class_balanced_softmax_bce(logits, y, w)
        raise LtrError(f"unknown cb variant {cb_variant!r}; use 'standard' or 'official'")
    if name in ("la", "bs"):
        prior = log_prior(counts).to(device)
        if name == "bs":
            return lambda logits, y: balanced_softmax(logits, y, prior)
        return lambda logits, y: logit_adjusted_ce(logits, y, prior, tau)
    if name == "ldam-drw":
        return LDAMLoss(counts, device)
    raise LtrError(f"unknown loss {name!r}; use one of ce, cb, la, bs, ldam-drw")
