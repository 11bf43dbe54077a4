"""Measurements of a trained task before its merge, along the merge line theta_hat_{t-1} + alpha Delta_t (adapter off,
weights put back exactly after each point): the oracle's held-out score, the calibrated closed forms' `TaskProbe`
(the task's loss on its Fisher sample and on its held-out part, the perturbation's late branch losses), and the
logged comparison of the quadratic model's predicted loss increase with the measured one."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
from collections.abc import Callable

import datasets
import torch

from ..config.checks import invalid
from ..data.streams import split_holdout
from ..heads.alignment import HeadAlignment
from ..heads.estimate import binomial_se, drift_spread, move_ratio, pooled_covariance, pseudo_accuracy, seen_estimate
from ..method.adapters import adapter_disabled, base_weights
from ..method.fisher import fisher_sample
from ..method.strategies.base import MergePlan, TaskProbe
from .evaluation import mean_loss, seen_classes


class MergeLine:
    """theta_hat_{t-1} + alpha Delta_t with the adapter off: `at(alpha, fn)` evaluates fn() there."""

    def __init__(self, weights, vector, before: dict):
        self.weights, self.deltas = weights, vector.deltas
        self.origin = {k: weights.value(k, w).float().clone() for k, w in base_weights(weights.model).items()}
        self.origin.update(before)

    def at(self, alpha: float, fn: Callable[[], float]) -> float:
        self.weights.apply(self.deltas, dict.fromkeys(self.deltas, alpha), base=self.origin)
        try:
            with adapter_disabled(self.weights.model):
                return fn()
        finally:  # back to theta_hat_{t-1} exactly (origin + 0 * delta), as the merge expects
            self.weights.apply(self.deltas, dict.fromkeys(self.deltas, 0.0), base=self.origin)


class RevertedLine(MergeLine):
    """theta_0 + alpha Delta_t (the earlier merges undone on the keys the task vector holds): `at(alpha, fn)` evaluates
    fn() there and puts the weights back on `home`'s origin, theta_hat_{t-1}, exactly."""

    def __init__(self, home: MergeLine, pretrained: dict):
        self.weights, self.deltas, self.home = home.weights, home.deltas, home
        self.origin = {**home.origin, **{k: v for k, v in pretrained.items() if k in home.origin}}

    def at(self, alpha: float, fn: Callable[[], float]) -> float:
        try:
            return super().at(alpha, fn)
        finally:
            self.weights.apply(self.deltas, dict.fromkeys(self.deltas, 0.0), base=self.home.origin)


def training_sample(task, cap: int | None, seed: int):
    """The task's training samples a Fisher pass with this cap and seed uses (a streamed split: its first `cap`)."""
    if isinstance(task.train, datasets.IterableDataset):
        return list(itertools.islice(task.train, cap))
    return fisher_sample(task.train, cap, seed)


def hold_out(task, fraction: float, seed: int, field: str) -> None:
    """Hold out `fraction` of the task's training data for the probe, once (it is not trained on); `field` is the
    knob that set the fraction, named if the data cannot be split."""
    if fraction > 0 and getattr(task, "heldout", None) is None:
        task.train, task.heldout = split_holdout(task.train, fraction, seed, field)


def task_probe(line: MergeLine, loop, t: int, task, trainer) -> TaskProbe:
    """The calibrated closed forms' measurements of task t (its training mask; eval mode)."""
    batch, collate = loop.fisher_args.fisher_batch_size, loop.stream.collate_fn
    sample = training_sample(task, loop.fisher_args.fisher_max_samples, loop.args.seed + t)

    def loss_on(data) -> Callable[[float], float]:
        def at(alpha: float) -> float:
            loop.head.set_active(loop.head.train_classes(task))
            return line.at(alpha, lambda: mean_loss(loop.model, data, collate, batch))

        return at

    heldout = getattr(task, "heldout", None)
    losses = trainer.branch_losses() if hasattr(trainer, "branch_losses") else {}
    return TaskProbe(loss_on(sample), loss_on(heldout) if heldout is not None else None, losses, loop.args.perturb_eps)


def eval_loss(loop, task) -> float:
    """The task's loss on its eval split under its training mask (for `log_loss_increase`)."""
    loop.head.set_active(loop.head.train_classes(task))
    return mean_loss(loop.model, task.eval, loop.stream.collate_fn, loop.args.per_device_eval_batch_size)


def loss_increase(loop, task, plan: MergePlan, at_one: float) -> dict:
    """The quadratic model's predicted loss increase of the task, (1/2)(1 - alpha)^2 <F_t, Delta^2> (raw, and with the
    calibrated Fisher), against the measured L(alpha) - L(1) on its eval split, right after the merge (adapter zero);
    `at_one` is L(1), measured on the merge line before."""
    a, terms, calib = plan.choice.alpha, plan.terms, plan.calibration or {}
    raw = calib.get("fisher_delta_sq", terms.fisher_delta_sq if terms else float("nan"))
    out = {"alpha": a, "measured": eval_loss(loop, task) - at_one, "predicted": 0.5 * (1 - a) ** 2 * raw}
    if "kappa" in calib:
        out["predicted_calibrated"] = 0.5 * (1 - a) ** 2 * calib["kappa"] * raw
    return out


@dataclasses.dataclass
class Validation:
    """`validated-alpha`'s estimate(alpha) of task t's merge (`validation_estimate`), and the features of all the
    task's training rows under the merge at an alpha where they were taken already (`features[alpha]`: at 0 those
    taken before training, elsewhere a trial's that took them all under its own weights): the head alignment after
    the merge at that alpha reuses them instead of a pass (`reused_features`); each held-out sample's weighted score
    per alpha (`correct[alpha]`: its correctness times the new classes' share of the estimate), for paired
    comparisons."""

    estimate: Callable[[float], dict]
    features: dict[float, tuple]
    adopt: Callable[[], None] = lambda: None  # a scan from theta_0: what the merge taken from there changes
    correct: dict[float, list[float]] = dataclasses.field(default_factory=dict)

    def __call__(self, alpha: float) -> dict:
        return self.estimate(alpha)


def knots_around(knots, alpha: float) -> tuple[float, ...]:
    """The knots whose passes a trial at alpha needs: the knot alpha stands for (within 1e-9), else the nearest knot
    on each side."""
    knot = next((k for k in knots if math.isclose(k, alpha, rel_tol=0.0, abs_tol=1e-9)), None)
    if knot is not None:
        return (knot,)
    return max(k for k in knots if k < alpha), min(k for k in knots if k > alpha)


class Knots:
    """`validation_features: interpolated`: a trial's features (of the training rows it aligns on and of the held-out
    rows) piecewise linear in alpha between passes at the knots (`validation_knots`, 0 and 1 among them), each knot's
    passes taken when a trial first needs them: at a knot the model's own features, between two their chord
    (`torch.lerp`). At 0 (theta_hat_{t-1}) the training rows' are those the alignment took before training. An alpha
    within rounding of a knot (1e-9) is that knot."""

    def __init__(self, knots, line: MergeLine, align, model, view, heldout, rows: list[int]):
        self.knots, self.line, self.align, self.model = sorted(float(k) for k in knots), line, align, model
        self.data = (view.train, heldout)
        held, labels = line.at(0.0, lambda: align.features_of(model, heldout))
        self.labels, self.taken = (align.labels[rows], labels), {0.0: (align.before[rows], held)}

    def knot(self, alpha: float) -> float | None:
        """The knot alpha stands for (within 1e-9), or None between knots."""
        around = knots_around(self.knots, alpha)
        return around[0] if len(around) == 1 else None

    def prepare(self, alpha: float) -> None:
        """The passes at the knots around alpha (taken before the line moves to alpha)."""
        for knot in self._around(alpha):
            if knot not in self.taken:
                self.taken[knot] = self.line.at(knot, lambda: self._passes())

    def _passes(self) -> tuple:
        (x, y), (hx, hy) = (self.align.features_of(self.model, data) for data in self.data)
        if not (torch.equal(y.cpu(), self.labels[0].cpu()) and torch.equal(hy.cpu(), self.labels[1].cpu())):
            fix = "the task's rows came back in another order or with other labels: set validation_features: exact."
            raise invalid("validation_features", "interpolated", fix)
        return x, hx

    def _around(self, alpha: float) -> tuple[float, ...]:
        return knots_around(self.knots, alpha)

    def at(self, alpha: float) -> tuple[tuple, tuple]:
        """((training rows' features, labels), (held-out rows' features, labels)) at alpha (after `prepare`)."""
        around = self._around(alpha)
        if len(around) == 1:
            x, hx = self.taken[around[0]]
        else:
            (low, high), w = around, (alpha - around[0]) / (around[1] - around[0])
            x, hx = (torch.lerp(a, b, w) for a, b in zip(self.taken[low], self.taken[high]))
        return (x, self.labels[0]), (hx, self.labels[1])


def interpolated(line: MergeLine, loop, t: int, view, heldout, rows: list[int]) -> Knots | None:
    """The trials' `Knots` along theta_hat_{t-1} + alpha Delta_t where `validation_features` is 'interpolated', from
    the second task on (the first has no features taken before training); None (a pass per trial) otherwise, and at
    the second merge of `validation_revisit_first`, whose kept line is compared with the exact scan from theta_0."""
    strategy = loop.strategy
    if t == 0 or getattr(strategy, "validation_features", "exact") != "interpolated":
        return None
    if t == 1 and getattr(strategy, "validation_revisit_first", False):
        return None
    return Knots(strategy.validation_knots, line, alignment_of(loop), loop.model, view, heldout, rows)


def validation_estimate(line: MergeLine, loop, t: int, task, origin: torch.Tensor | None = None) -> Validation:
    """`validated-alpha`'s estimate(alpha) of the seen accuracy after merging task t at alpha, under the head the
    prototype alignment would fit there (its `trial`, on at most `validation_samples` of the task's training samples):
    the new classes' accuracy on the task's held-out training data, the old classes' on their drift-compensated
    statistics widened by the unpredicted drift. No eval split is read. On every row, the trial at alpha = 0 (theta_hat
    _{t-1}, where the alignment took the task's features before training) reuses those features; with interpolated
    features a trial between two knots takes their chord (`Knots`), not a pass. With `origin` (the task's rows under
    theta_0, along a `RevertedLine`): every trial from theta_0's statistics of the first task, each a pass."""
    align = alignment_of(loop)
    if align is None or (t and align.before is None) or getattr(task, "heldout", None) is None:
        raise ValueError("validated-alpha needs the prototype head alignment with sdc and a held-out part of the task")
    seen = seen_classes(loop.stream.tasks[: t + 1])
    old = [c for c in seen if c not in task.classes]  # none at the first task: the estimate is the held-out accuracy
    rebased = contextlib.nullcontext if origin is None else lambda: align.rebased(origin)
    with rebased():
        means = align.stats.get("mean")  # under the line's start: the drift weights are taken against them
    rows = training_subset(len(task.train), loop.strategy.validation_samples, loop.args.seed + t)
    view = dataclasses.replace(task, train=task.train.select(rows))
    every_row, start = len(rows) == len(task.train), (align.before, align.labels)
    # a merge at alpha = 0 leaves theta_hat_{t-1}: its features of every training row are those taken before training
    features: dict[float, tuple] = {0.0: start} if t and origin is None else {}
    correct: dict[float, list[float]] = {}
    share = len(task.classes) / len(seen)  # the new classes' weight in the estimate
    on_heldout = getattr(loop.strategy, "validation_drift", "train") == "heldout" and old
    knots = interpolated(line, loop, t, view, task.heldout, rows) if origin is None else None
    start_heldout = None
    if on_heldout:
        start_heldout = (
            knots.at(0.0)[1][0] if knots else line.at(0.0, lambda: align.features_of(loop.model, task.heldout))[0]
        )

    def measure(alpha: float) -> dict:
        known = start if every_row and alpha == 0 and t and origin is None else None  # (none before the first task)
        known, held = knots.at(alpha) if knots is not None else (known, None)
        with rebased(), align.subset(rows), align.known_features(known), loop.callbacks.trial(t, loop.model, view):
            if every_row and (knots is None or knots.knot(alpha) is not None):  # at a knot: the model's own
                features[alpha] = (align.after, align.labels)
            x, y = align.features_of(loop.model, task.heldout) if held is None else held
            hits = align.correct(loop.model, x, y, seen)
            new = float(hits.double().mean())
            weight, bias = (None if p is None else p.detach().cpu() for p in align.head.parameters())
            rows_moved = None if start_heldout is None else (start_heldout.cpu(), x.cpu())
            olds = old_accuracies(align, means, old, seen, weight, bias, loop.args.seed, rows_moved) if old else {}
        correct[alpha] = [share * float(h) for h in hits]
        return {"estimate": seen_estimate(new, len(task.classes), olds), "new": new,
                "old": sum(olds.values()) / max(len(olds), 1) if olds else None,
                "se": share * binomial_se(new, len(task.heldout))}  # fmt: skip

    adopt = (lambda: None) if origin is None else (lambda: align.rebase(origin))

    def estimate(alpha: float) -> dict:
        if knots is not None:
            knots.prepare(alpha)
        return line.at(alpha, lambda: measure(alpha))

    return Validation(estimate, features, adopt, correct)


def feature_move(line: MergeLine, loop, task) -> dict:
    """How far the whole task vector moves the features of the task's held-out rows (never trained on): their
    `move_ratio` from alpha 0 (theta_hat_{t-1}) to alpha 1 along the merge line, two passes."""
    align, heldout = alignment_of(loop), getattr(task, "heldout", None)
    if align is None or heldout is None:
        raise ValueError("validation_first_move_limit needs the prototype head alignment and the task's held-out part")
    before, after = (line.at(a, lambda: align.features_of(loop.model, heldout))[0] for a in (0.0, 1.0))
    return {"move": move_ratio(before.cpu(), after.cpu()), "rows": len(heldout)}


def reverted_estimate(home: MergeLine, loop, t: int, task) -> Validation:
    """`validation_estimate` along theta_0 + alpha Delta_t (`RevertedLine`), from the first task's statistics under
    theta_0 and the task's rows under theta_0 (one features pass); its `adopt` rebases the head alignment there."""
    line, align = RevertedLine(home, loop.strategy.pretrained), alignment_of(loop)
    origin, _ = line.at(0.0, lambda: align._features(loop.model, task))
    return validation_estimate(line, loop, t, task, origin=origin)


def old_accuracies(align, means, old: list[int], seen: list[int], weight, bias, seed: int, moved=None) -> dict:
    """Each old class's estimated accuracy under a trial's head: pseudo-features from its stored statistics, the
    pooled covariance widened by the drift near the class that compensation does not predict, measured on the task's
    training rows the trial aligned on, or on `moved` (the same rows' features before and after: the held-out part);
    where the alignment recorded a width factor per class (`validation_old_width`), the pooled covariance is first
    scaled by the class's."""
    before, after = (align.before.cpu(), align.after.cpu()) if moved is None else moved
    spread = drift_spread(means, old, before, after)
    cov = pooled_covariance(align.stats, seen)
    ratio = {c: 1.0 if align.widths is None else float(align.widths[c]) for c in old}
    return {c: pseudo_accuracy(weight, bias, align.stats["mean"][c], ratio[c] * cov + spread[c], c, seen,
                               align.samples, seed + c)
            for c in old}  # fmt: skip


def alignment_of(loop) -> HeadAlignment | None:
    """The run's prototype head alignment callback, if any."""
    return next((cb for cb in loop.callbacks.callbacks if isinstance(cb, HeadAlignment)), None)


def reused_features(loop, validation: Validation | None, alpha: float):
    """Around the callbacks' `on_merge` after a merge at `alpha`: the features a validation trial took there (the
    same weights, the same rows), given to the head alignment instead of its pass; else nothing."""
    pair = None if validation is None else validation.features.get(alpha)
    align = alignment_of(loop)
    return contextlib.nullcontext() if pair is None or align is None else align.known_features(pair)


def training_subset(size: int, cap: int, seed: int) -> list[int]:
    """At most `cap` of `size` rows, drawn once with `seed`, in order."""
    if size <= cap:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), cap))
