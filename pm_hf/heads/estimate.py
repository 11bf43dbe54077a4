"""An estimate of a merge's accuracy over every seen class that reads no old data and no eval split (the
`validated-alpha` rule, docs/method.md): the new classes are scored on a held-out part of the task's training data,
the old classes on pseudo-features drawn from their stored statistics, widened by the part of the feature drift that
drift compensation does not predict (measured on the task's own data)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def drift_spread(
    means: torch.Tensor, classes: list[int], before: torch.Tensor, after: torch.Tensor
) -> dict[int, torch.Tensor]:
    """For each class c in `classes`: the covariance [d, d] of the per-sample drifts (after_i - before_i) around their
    weighted mean, with the weights of semantic drift compensation (`compensate_drift`): what of the drift near the
    class the compensation does not predict. Zero when every sample moves alike (a pure translation)."""
    b, drift = before.double(), (after - before).double()
    out = {}
    for c in classes:
        dist = ((b - means[c].double()) ** 2).sum(1)
        w = torch.softmax(-dist / (2 * dist.median().clamp_min(1e-12)), dim=0)
        centred = drift - w @ drift
        out[c] = (centred * w[:, None]).T @ centred
    return out


def pseudo_accuracy(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    cov: torch.Tensor,
    label: int,
    seen: list[int],
    n: int,
    seed: int,
) -> float:
    """The head's accuracy over the `seen` classes on `n` features drawn from N(mean, cov) of class `label`."""
    d = cov.shape[0]
    chol = torch.linalg.cholesky(cov.double() + 1e-8 * (torch.trace(cov.double()) / d + 1e-12) * torch.eye(d).double())
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = (mean.double() + z @ chol.T).float()
    cls = torch.tensor(seen)
    logits = x @ weight.float()[cls].T + (0 if bias is None else bias.float()[cls])
    return float((cls[logits.argmax(-1)] == label).double().mean())


def pooled_covariance(stats: dict[str, torch.Tensor], classes: list[int], shrinkage: float = 1e-3) -> torch.Tensor:
    """The shared within-class covariance the head alignment samples from (`sample_class_features`)."""
    dof = max(float(stats["count"][classes].double().sum()) - len(classes), 1.0)
    cov = stats["scatter"].double() / dof
    d = cov.shape[0]
    return (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=torch.float64)


def calibrated_width(score: Callable[[float], float], target: float, high: float = 64.0, steps: int = 12) -> float:
    """The factor k >= 1 at which `score(k)` (a class's `pseudo_accuracy` from N(mean, k cov), its draws fixed) falls
    to `target`, the accuracy the head has on the class's own rows: 1 where `score(1)` is no higher already, `high`
    where even `score(high)` is higher. Bisection on log k, `steps` halvings: with the draws fixed each one moves away
    from the mean along its own direction as k grows, so the score falls monotonically where the head puts the mean
    itself in its class (a linear head's region of a class is convex); elsewhere the bisection still ends."""
    if score(1.0) <= target:
        return 1.0
    if score(high) > target:
        return high
    low, top = 0.0, math.log(high)
    for _ in range(steps):
        mid = (low + top) / 2
        low, top = (mid, top) if score(math.exp(mid)) > target else (low, mid)
    return math.exp(top)


def move_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """How far features moved for their spread: the root mean square of the per-sample moves (after_i - before_i)
    over the root mean square distance of `before` from its mean. 1: the samples moved, on average, as far as they
    lie from their centre; a pure translation by that distance gives 1 as well."""
    b, a = before.double(), after.double()
    moved = ((a - b) ** 2).sum(1).mean()
    spread = ((b - b.mean(0)) ** 2).sum(1).mean()
    return float((moved / spread.clamp_min(1e-30)) ** 0.5)


def seen_estimate(new_accuracy: float, new_classes: int, old_accuracies: dict[int, float]) -> float:
    """Class-balanced accuracy over the seen classes: the new classes' held-out accuracy counts once per new class,
    each old class its own estimate."""
    total = new_accuracy * new_classes + sum(old_accuracies.values())
    return total / (new_classes + len(old_accuracies))


def binomial_se(accuracy: float, n: int) -> float:
    """The standard error of an accuracy measured on `n` samples, sqrt(p (1 - p) / n)."""
    return (accuracy * (1 - accuracy) / max(n, 1)) ** 0.5
