"""Per-class and Many/Medium/Few accuracy, flip averaging, marginal likelihood, weight norms, and the
feature analysis of Hasegawa & Sato (Fisher discriminant ratio, cone effect)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .data import class_groups, normalize
from .engine.precision import autocast


@torch.no_grad()
def _eval_batches(model: nn.Module, images: torch.Tensor, batch_size: int, dtype: torch.dtype | None,
                  fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn(normalised batch) over uint8 images in eval mode under autocast, concatenated as float32."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        with autocast(x.device.type, dtype):
            outs.append(fn(x).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, flip: bool = False,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Float32 logits for uint8 images on the model's device; flip=True averages with the mirror; dtype:
    the autocast dtype (torch.bfloat16 / torch.float16), None for fp32."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = model(x).float()
        return 0.5 * (out + model(torch.flip(x, dims=[3])).float()) if flip else out

    return _eval_batches(model, images, batch_size, dtype, logits)


def extract_features(model: nn.Module, images: torch.Tensor, batch_size: int = 1024,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pooled penultimate features (after the last ReLU) of uint8 images, eval mode, float32."""
    return _eval_batches(model, images, batch_size, dtype, model.features)


def _class_index(features: torch.Tensor, labels: torch.Tensor,
                 what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features as float64 n x d, labels remapped to 0..k-1), after checking the shapes agree."""
    if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
        raise ValueError(f"{what} needs features (n x d) and labels (n,) of the same n; got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}")
    _, inverse = torch.unique(labels.cpu(), return_inverse=True)
    return features.detach().cpu().double(), inverse


def fisher_ratio(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fisher discriminant ratio Tr(S_W^+ S_B) of features by class, in float64.

    S_B = sum_c n_c (mu_c - mu)(mu_c - mu)^T and S_W = sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T.
    S_W is inverted with the Moore-Penrose pseudo-inverse (symmetric eigendecomposition, eigenvalues
    below d * eps * the largest treated as zero), so dead ReLU units (all-zero feature dimensions)
    drop out instead of making the ratio infinite. Needs two classes and two samples in every class.
    """
    x, y = _class_index(features, labels, "fisher_ratio")
    k = int(y.max()) + 1 if len(y) else 0
    if k < 2:
        raise ValueError(f"fisher_ratio needs at least two classes; got {k}")
    n_c = torch.bincount(y, minlength=k)
    if int(n_c.min()) < 2:
        lonely = torch.nonzero(n_c < 2).flatten().tolist()
        raise ValueError(f"fisher_ratio needs at least two samples per class; {len(lonely)} class(es) "
                         "have one (pass more samples, or drop those classes)")
    mu = x.mean(0)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, y, x)
    mu_c = sums / n_c[:, None].double()
    centred = x - mu_c[y]
    s_w = centred.T @ centred
    between = (mu_c - mu) * n_c[:, None].double().sqrt()
    s_b = between.T @ between
    return float(torch.trace(torch.linalg.pinv(s_w, hermitian=True) @ s_b))


def cone_effect(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Mean cosine similarity of two different samples' features: all pairs, same class, other classes.

    Computed from per-class sums of the unit-normalised features (sum_{i != j} u_i.u_j = |sum u|^2 -
    sum |u_i|^2), never the n x n matrix. A zero feature vector counts as similarity 0 with everything.
    `same` is None when no class has two samples, `different` when there is one class.
    """
    x, y = _class_index(features, labels, "cone_effect")
    n = len(x)
    if n < 2:
        raise ValueError(f"cone_effect needs at least two samples; got {n}")
    u = torch.nn.functional.normalize(x, dim=1)
    self_dot = (u * u).sum(1)  # 1, or 0 for a zero vector
    k = int(y.max()) + 1
    n_c = torch.bincount(y, minlength=k).double()
    s_c = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, y, u)
    self_c = torch.zeros(k, dtype=x.dtype).index_add_(0, y, self_dot)
    total = float(s_c.sum(0).square().sum() - self_dot.sum())
    same = float((s_c.square().sum(1) - self_c).sum())
    same_pairs = float((n_c * (n_c - 1)).sum())
    diff_pairs = float(n * (n - 1)) - same_pairs
    return {"all": total / (n * (n - 1)), "same": same / same_pairs if same_pairs else None,
            "different": (total - same) / diff_pairs if diff_pairs else None}


def feature_analysis(features: torch.Tensor, labels: torch.Tensor) -> dict:
    """What metrics.json records of a feature set: its Fisher ratio and cone effect."""
    return {"fdr": fisher_ratio(features, labels), "cone": cone_effect(features, labels)}


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


def evaluate(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, counts: list[int],
             val_idx: torch.Tensor | None = None, heldout_idx: torch.Tensor | None = None,
             predict: Callable[[bool], torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> dict:
    """What metrics.json records, plain and flip-averaged, on the full test set and its halves. predict(flip)
    gives the test logits when they can be had without a pass over the images (dtype: its autocast)."""
    if predict is None:
        def predict(flip: bool) -> torch.Tensor:
            return predict_logits(model, test_x, flip=flip, dtype=dtype)

    plain, flipped = predict(False), predict(True)
    out: dict = {}
    out["plain"], out["per_class_acc"] = _summary(plain, test_y, counts)
    out["flip"], out["per_class_acc_flip"] = _summary(flipped, test_y, counts)
    for name, idx in (("val", val_idx), ("heldout", heldout_idx)):
        if idx is not None and len(idx):
            out[name] = {"plain": _summary(plain[idx], test_y[idx], counts)[0],
                         "flip": _summary(flipped[idx], test_y[idx], counts)[0]}
    out["weight_norms"] = weight_norms(model).cpu().tolist()
    out["marginal_likelihood"] = marginal_likelihood(plain).cpu().tolist()
    out["counts"] = list(counts)
    return out
