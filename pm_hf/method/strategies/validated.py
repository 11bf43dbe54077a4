"""`validated-alpha`: task t's alpha chosen on a grid by an estimate of the merged model's accuracy over every seen
class that reads neither old data nor any eval split (pm_hf.heads.estimate): the new classes on a held-out part of
the task's training data, the old ones on their stored statistics widened by the unpredicted feature drift. It needs
the prototype head alignment with drift compensation (the regime of an aligned head: docs/method.md)."""

from __future__ import annotations

import math

from ...config.checks import check_number, invalid, is_number
from .base import MergePlan, MergeStrategy, alpha_plan, constant, register
from .knobs import Knob


def _grid(name, value) -> None:
    if not isinstance(value, list) or not value or not all(is_number(a) and 0 <= a <= 1 for a in value):
        raise invalid(name, value, "give a list of alphas in [0, 1], e.g. [0, 0.1, ..., 1].")


def _holdout(name, value) -> None:
    if not is_number(value) or not 0 < value <= 0.5:
        raise invalid(name, value, "give the fraction of each task's training data held out, in (0, 0.5].")


def one_se_choice(estimates: dict[float, float], errors: dict[float, float]) -> float:
    """The smallest alpha whose estimate is within one standard error of the best (Breiman's one-standard-error rule:
    among choices the data cannot tell apart, the one that moves the model least)."""
    best = max(estimates, key=lambda a: (estimates[a], -a))
    return min(a for a in estimates if estimates[a] >= estimates[best] - errors[best])


def paired_errors(estimates: dict[float, float], correct: dict[float, list[float]]) -> dict[float, float]:
    """Each alpha's standard error of its estimate's difference from the best's, paired on the same held-out samples:
    sd_i(c_best,i - c_alpha,i) / sqrt(n), where `correct[alpha]` holds each held-out sample's weighted score (its
    correctness times the new classes' share of the estimate). The one-standard-error rule with these errors takes the
    smallest alpha the held-out samples cannot tell from the best (the samples both score alike count for neither)."""
    best = max(estimates, key=lambda a: (estimates[a], -a))
    out = {}
    for alpha, scores in correct.items():
        diff = [b - a for b, a in zip(correct[best], scores, strict=True)]
        mean = sum(diff) / len(diff)
        out[alpha] = (sum((d - mean) ** 2 for d in diff) / len(diff)) ** 0.5 / len(diff) ** 0.5
    return out


def paired_choice(estimates: dict[float, float], correct: dict[float, list[float]]) -> float:
    """The smallest alpha whose estimate is within its paired standard error (`paired_errors`) of the best."""
    best = max(estimates, key=lambda a: (estimates[a], -a))
    errors = paired_errors(estimates, correct)
    return min(a for a in estimates if estimates[a] >= estimates[best] - errors[a])


def scan(grid, estimate, patience: int, stop_se: float) -> dict[float, dict]:
    """`estimate(alpha)` for the grid's alphas in ascending order, stopped once `patience` points in a row fall more
    than `stop_se` standard errors below the best so far (0: the whole grid). The one-standard-error rule takes the
    smallest alpha within one error of the best: points that far below it, and falling, do not change its choice
    unless the estimate climbs back by more than that later (it falls with alpha as the old classes drift)."""
    measured, below = {}, 0
    for alpha in sorted({float(a) for a in grid}):
        measured[alpha] = m = estimate(alpha)
        best = max(measured.values(), key=lambda x: x["estimate"])
        below = below + 1 if m["estimate"] < best["estimate"] - stop_se * best["se"] else 0
        if patience and below >= patience:
            break
    return measured


def _alpha(name, value) -> None:
    if not is_number(value) or not 0 <= value <= 1:
        raise invalid(name, value, "give an alpha in [0, 1], e.g. 0.5 (half the first task's adapter) or 1 (all).")


def _limit(name, value) -> None:
    check_number(name, value, 0, low_open=True, optional=True)  # a finite ratio > 0, or null (no limit)


def _count(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, value, "give a positive number of samples, e.g. 256.")


def _patience(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(name, value, "give a number of grid points >= 0 (0: always the whole grid), e.g. 1.")


def _stop_se(name, value) -> None:
    if not is_number(value) or not math.isfinite(value) or value < 1:
        raise invalid(name, value, "give a number of standard errors >= 1 (the choice's own margin), e.g. 2.")


def _flag(name, value) -> None:
    if not isinstance(value, bool):
        raise invalid(name, value, "give true or false.")


def _drift_rows(name, value) -> None:
    if value not in ("train", "heldout"):
        raise invalid(name, value, "give 'train' (the trial's training rows) or 'heldout' (the task's held-out part).")


def _features_rule(name, value) -> None:
    if value not in ("exact", "interpolated"):
        raise invalid(name, value, "give 'exact' (a pass per alpha) or 'interpolated' (passes at the knots only).")


def _knots(name, value) -> None:
    ok = isinstance(value, list) and all(is_number(a) and 0 <= a <= 1 for a in value) and 0 in value and 1 in value
    if not ok:
        raise invalid(
            name, value, "give the alphas of the passes in [0, 1], 0 and 1 among them, e.g. [0, 0.1, 0.2, 1]."
        )


def _width(name, value) -> None:
    if value not in ("pooled", "calibrated"):
        raise invalid(
            name, value, "give 'pooled' (the stored statistics as they are) or 'calibrated' (docs/method.md)."
        )


@register
class ValidatedAlpha(MergeStrategy):
    name = "validated-alpha"
    reference = (
        "pm_hf: per task, the grid alpha with the best estimated accuracy over all seen classes under the aligned "
        "head — new classes on held-out training data, old classes on drift-widened stored statistics (no eval data)"
    )
    knobs = (
        Knob("validation_grid", [i / 10 for i in range(11)], _grid, "the alphas tried per task"),
        Knob("validation_holdout", 0.1, _holdout, "the fraction of each task's training data held out for scoring"),
        Knob(
            "validation_samples",
            256,
            _count,
            "the task's training samples a trial's head alignment sees",
            before="256 or all of the task's training samples",
        ),
        Knob(
            "validation_patience",
            1,
            _patience,
            "stop the scan after this many points in a row far below the best",
            before="0 (the whole grid), 2 or 1",
        ),
        Knob("validation_stop_se", 2.0, _stop_se, "how far below the best (standard errors) a point counts as far"),
        Knob(
            "validation_first_task",
            False,
            _flag,
            "also choose the first task's alpha (the least move its held-out data cannot tell from the best)",
        ),
        Knob(
            "validation_first_alpha",
            0.5,
            _alpha,
            "the first task's alpha where it is not chosen (`validation_first_task: false`): the midpoint of theta_0 "
            "and theta_hat_1, half of an adaptation to two to four classes that the later classes must live with",
            before="1.0 (the first task merged whole), or 0.5 (at commit 8e53af4)",
        ),
        Knob(
            "validation_first_move_limit",
            5.0,
            _limit,
            "the first task merged whole (alpha 1) where the whole adapter moves its held-out rows' features by at "
            "most this many times their spread under theta_0 (root mean squares), else at `validation_first_alpha`; "
            "null: always at `validation_first_alpha` (unread with `validation_first_task: true`)",
            before="null (pm_hf 0.4.0 and older: the first task at validation_first_alpha always)",
        ),
        Knob(
            "validation_revisit_first",
            False,
            _flag,
            "at the second merge, also scan from theta_0 (the first merge undone); taken where it is one error better",
        ),
        Knob(
            "validation_paired",
            False,
            _flag,
            "the margin: each alpha's error of its difference from the best, paired on the held-out samples",
        ),
        Knob(
            "validation_drift",
            "train",
            _drift_rows,
            "the rows whose unpredicted drift widens the old classes: 'train' (a trial's) or 'heldout' (untrained)",
        ),
        Knob(
            "validation_old_width",
            "pooled",
            _width,
            "each old class's Gaussian: the pooled covariance ('pooled'), or scaled until it scores what the head "
            "scored on the class's own training rows at its merge ('calibrated')",
        ),
        Knob(
            "validation_features",
            "interpolated",
            _features_rule,
            "a trial's features: piecewise linear in alpha between passes at `validation_knots` ('interpolated'), "
            "or a pass under its own weights ('exact')",
            before="'exact' or 'interpolated'",
        ),
        Knob(
            "validation_knots",
            [0.0, 0.1, 0.2, 1.0],
            _knots,
            "the alphas where interpolated features are a pass (each taken once a trial needs it); a chord between",
        ),
        Knob(
            "validation_log_eval",
            False,
            _flag,
            "diagnostics: also log each scanned alpha's score on the eval splits (after the choice; never read by it)",
        ),
        "head_align",
        "head_align_drift",
    )
    needs_validation = True
    holdout_field = "validation_holdout"

    @staticmethod
    def check(values) -> None:
        ours = getattr(values, "merge_method", ValidatedAlpha.name) == ValidatedAlpha.name  # (an instance: ours)
        if ours and (values.head_align != "prototypes" or values.head_align_drift != "sdc"):
            fix = "validated-alpha scores merges under the prototype head: set head_align: prototypes, "
            raise invalid("head_align", values.head_align, fix + "head_align_drift: sdc.")

    @property
    def needs_pretrained(self) -> bool:  # theta_0, to undo the first merge (`validation_revisit_first`)
        return bool(self.validation_revisit_first)

    @property
    def old_width(self) -> str | None:
        return None if self.validation_old_width == "pooled" else self.validation_old_width

    @property
    def revisits_first_merge(self) -> bool:
        return bool(self.validation_revisit_first)

    @property
    def holdout(self) -> float:
        return float(self.validation_holdout)

    def merge(self, context) -> MergePlan:
        vector = context.vector
        if context.t == 0 and not self.validation_first_task:  # no seen class to trade off yet, unseen ones to keep
            return self._first(context)
        estimate = context.validation
        if estimate is None:
            raise ValueError("merge strategy 'validated-alpha' needs the loop's validation estimate")
        alphas, best = self._choose(estimate)
        if self.validation_log_eval:  # what the estimate stands for, beside it: the oracle's score of the same merge
            self._log_eval(context, alphas)
        info = {"method": self.name, "alpha": best, "grid": {str(a): m for a, m in alphas.items()}}
        if context.t == 1 and self.validation_revisit_first:
            return self._revisit(context, alphas, best, info)
        return alpha_plan(vector, constant(vector.deltas, best), calibration=info)

    def _first(self, context) -> MergePlan:
        """The first merge: whole where the adapter refines the features of data it did not see (it moves them by no
        more than `validation_first_move_limit` times their spread), else at `validation_first_alpha`."""
        alpha, limit = float(self.validation_first_alpha), self.validation_first_move_limit
        if limit is None:
            return alpha_plan(context.vector, constant(context.vector.deltas, alpha))
        measured = context.feature_move
        if measured is None:
            fix = "needs the first task's held-out data (the continual loop or pm-hf merge --config); or set null."
            raise invalid("validation_first_move_limit", limit, fix)
        alpha = 1.0 if measured["move"] <= float(limit) else alpha
        info = {"method": self.name, "alpha": alpha, "first_move": measured, "first_move_limit": float(limit)}
        return alpha_plan(context.vector, constant(context.vector.deltas, alpha), calibration=info)

    def _choose(self, estimate) -> tuple[dict[float, dict], float]:
        """The scanned grid and its one-standard-error choice."""
        alphas = scan(self.validation_grid, estimate, int(self.validation_patience), float(self.validation_stop_se))
        estimates = {a: m["estimate"] for a, m in alphas.items()}
        if not self.validation_paired:
            return alphas, one_se_choice(estimates, {a: m["se"] for a, m in alphas.items()})
        correct = {a: estimate.correct[a] for a in alphas}
        for alpha, error in paired_errors(estimates, correct).items():
            alphas[alpha]["se_paired"] = error
        return alphas, paired_choice(estimates, correct)

    def _revisit(self, context, alphas: dict[float, dict], best: float, info: dict) -> MergePlan:
        """The second merge scanned from theta_0 too (the first merge undone: it was taken at a fixed alpha with
        nothing seen to trade off); that line is taken where its choice's estimate beats the kept line's by more than
        the kept choice's standard error (the one-error rule again: undoing is a move the data must ask for)."""
        reverted, back = self._choose(context.reverted)
        kept = alphas[best]
        undo = reverted[back]["estimate"] > kept["estimate"] + kept["se"]
        info.update(reverted_grid={str(a): m for a, m in reverted.items()}, reverted=undo)
        if not undo:
            return alpha_plan(context.vector, constant(context.vector.deltas, best), calibration=info)
        context.validation.features.clear()  # a trial's features on the kept line are not the merged model's
        context.reverted.adopt()  # the head alignment from theta_0's statistics of the first task
        info["alpha"] = back
        return alpha_plan(context.vector, constant(context.vector.deltas, back), calibration=info, origin="pretrained")

    @staticmethod
    def _log_eval(context, alphas: dict[float, dict]) -> None:
        score = context.score
        if score is None:
            raise ValueError("validation_log_eval needs the run's eval splits (the oracle's score of a merge)")
        for alpha, measured in alphas.items():
            measured["eval"] = score(alpha)
