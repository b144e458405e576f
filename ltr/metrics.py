"""Per-class and Many/Medium/Few accuracy, flip averaging, marginal likelihood, weight norms."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .data import class_groups, normalize
from .precision import autocast


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1024,
    flip: bool = False,
    dtype: torch.dtype | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """Float32 logits for uint8 images on the model's device; flip=True averages with the mirror.

    dtype: autocast dtype (torch.bfloat16 / torch.float16), None for fp32; amp=True is the older
    spelling of dtype=torch.bfloat16.
    """
    if dtype is None and amp:
        dtype = torch.bfloat16
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        with autocast(x.device.type, dtype):
            logits = model(x).float()
            if flip:
                logits = 0.5 * (logits + model(torch.flip(x, dims=[3])).float())
        outs.append(logits)
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def per_class_accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class in percent (NaN for a class with no test image)."""
    correct = torch.bincount(labels[preds == labels], minlength=num_classes).float()
    total = torch.bincount(labels, minlength=num_classes).float()
    return 100.0 * correct / total


def group_accuracy(per_class: list[float] | torch.Tensor, counts: list[int]) -> dict:
    """Many/Medium/Few/All as the mean per-class accuracy of each group; None for an empty group."""
    acc = torch.as_tensor(per_class, dtype=torch.float64)
    out: dict[str, float | None] = {"all": float(acc.nanmean())}
    for name, classes in class_groups(counts).items():
        out[name] = float(acc[classes].nanmean()) if classes else None
    return out


def weight_norms(model: nn.Module) -> torch.Tensor:
    """L2 norm of each row of the classifier weight (one per class)."""
    return model.fc.weight.detach().float().norm(dim=1)


def marginal_likelihood(logits: torch.Tensor) -> torch.Tensor:
    """Mean softmax probability of each class over a set of images."""
    return torch.softmax(logits.float(), dim=1).mean(0)


def _summary(logits: torch.Tensor, labels: torch.Tensor, counts: list[int]) -> tuple[dict, list]:
    pca = per_class_accuracy(logits.argmax(1), labels, len(counts)).cpu()
    return group_accuracy(pca, counts), pca.tolist()


def evaluate(
    model: nn.Module,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    counts: list[int],
    val_idx: torch.Tensor | None = None,
    heldout_idx: torch.Tensor | None = None,
    amp: bool = False,
    predict: Callable[[bool], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """What metrics.json records, plain and flip-averaged, on the full test set and its halves.

    predict(flip) gives the test logits when they can be had without a pass over the images; dtype is
    the autocast dtype of that pass (None = fp32; amp=True is the older spelling of bf16).
    """
    if predict is None:
        def predict(flip: bool) -> torch.Tensor:
            return predict_logits(model, test_x, flip=flip, dtype=dtype, amp=amp)

    plain = predict(False)
    flipped = predict(True)
    out: dict = {}
    out["plain"], out["per_class_acc"] = _summary(plain, test_y, counts)
    out["flip"], out["per_class_acc_flip"] = _summary(flipped, test_y, counts)
    for name, idx in (("val", val_idx), ("heldout", heldout_idx)):
        if idx is not None and len(idx):
            out[name] = {
                "plain": _summary(plain[idx], test_y[idx], counts)[0],
                "flip": _summary(flipped[idx], test_y[idx], counts)[0],
            }
    out["weight_norms"] = weight_norms(model).cpu().tolist()
    out["marginal_likelihood"] = marginal_likelihood(plain).cpu().tolist()
    out["counts"] = list(counts)
    return out
