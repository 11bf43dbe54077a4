"""Strategies that merge theta_hat_t = theta_hat_{t-1} + alpha_t * Delta_t (alpha a float or, for CoFiMA, a
per-parameter weight): the closed form of P&M, CoFiMA, alpha schedules and the oracle."""

from __future__ import annotations

import math

import datasets
import torch

from ...config.checks import check_choice, check_number, invalid, is_number
from ...config.groups import ALPHA_CALIBRATIONS
from ...data.streams import Task, TaskStream
from ...distributed.sharding import scalar
from ..merge import (
    AlphaChoice,
    alpha_terms,
    branch_secant,
    cofima_weights,
    curve_alpha,
    secant_kappa,
    select_alpha,
    update_accumulators,
    zeros_like_dict,
)
from .base import MergePlan, MergeStrategy, alpha_plan, constant, fraction, prefixed, register


@register
class ClosedForm(MergeStrategy):
    name = "pm"
    shards = True
    reference = "Qiu et al. 2025, Perturb-and-Merge: closed-form alpha over the S/G accumulators (docs/method.md)"
    knobs = ("alpha_clip", "alpha_min", "alpha_granularity", "accumulator_device", "accumulator_dtype",
             "alpha_calibration", "calibration_holdout", "calibration_grid")  # fmt: skip
    needs_fisher = True

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.S: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}

    @property
    def needs_probe(self) -> bool:
        return self.alpha_calibration != "none"

    @property
    def holdout(self) -> float:
        return self.calibration_holdout if self.alpha_calibration == "curve" else 0.0

    @staticmethod
    def check(values) -> None:
        if not isinstance(values.alpha_clip, bool):
            raise invalid("alpha_clip", values.alpha_clip, "use true or false.")
        fraction(values, "alpha_min")
        check_choice("alpha_granularity", values.alpha_granularity, ("global", "module"))
        check_choice("alpha_calibration", values.alpha_calibration, ALPHA_CALIBRATIONS)
        check_choice("accumulator_dtype", values.accumulator_dtype, ("float32", "bfloat16"))
        check_number("calibration_holdout", values.calibration_holdout, 0, 0.5, low_open=True)
        grid = values.calibration_grid
        if not isinstance(grid, list) or not grid or not all(is_number(a) and 0 <= a <= 1 for a in grid):
            raise invalid("calibration_grid", grid, "give a list of alphas in [0, 1], e.g. [0, 0.05, ..., 1].")
        if values.alpha_calibration == "curve" and values.alpha_granularity != "global":
            raise invalid("alpha_granularity", values.alpha_granularity, "the measured curve gives one alpha per task.")

    def _groups(self, keys) -> list[list[str]]:
        if self.alpha_granularity == "global":
            return [list(keys)]
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
        return list(groups.values())

    def calibrate(self, deltas, fisher, S, G, probe) -> tuple[dict, dict]:
        """kappa_t F_t and what was measured: the secant at alpha = 0 on the task's training sample ('secant', and
        'branch' when its branch secant is unusable), the branch secant, or the held-out curve ('curve')."""
        if probe is None:
            raise ValueError(f"alpha_calibration {self.alpha_calibration!r} needs the task's probe (`TaskProbe`).")
        fd2 = alpha_terms(deltas, fisher, *(zeros_like_dict(deltas),) * 2).fisher_delta_sq
        info, target = {"method": self.alpha_calibration, "fisher_delta_sq": fd2}, None
        if self.alpha_calibration == "curve":
            grid = sorted({float(a) for a in self.calibration_grid} | {0.0, 1.0})
            losses = [probe.heldout_loss(a) for a in grid]
            target = 2.0 * (losses[0] - losses[-1])
            info.update(grid=grid, heldout_losses=losses)
        elif self.alpha_calibration == "branch":
            losses = probe.branch_losses
            target = branch_secant(losses.get(-1), losses.get(0), probe.eps)
            info.update(branch_losses={str(b): v for b, v in losses.items()}, branch_secant=target)
        if target is None:  # 'secant', or the branch secant's fallback
            at0, at1 = probe.loss(0.0), probe.loss(1.0)
            target = 2.0 * (at0 - at1)
            info.update(loss_at_0=at0, loss_at_1=at1)
        kappa = secant_kappa(target, fd2)
        calibrated = {k: v * kappa for k, v in fisher.items()}
        info.update(target=target, kappa=kappa)
        if self.alpha_calibration == "curve":
            old = alpha_terms(deltas, zeros_like_dict(deltas), S, G)  # <G, Delta> and <S, Delta^2>
            info["alpha"], info["objective"] = curve_alpha(grid, losses, old.g_delta, old.denominator)
        return calibrated, info

    def merge(self, t, vector, fisher=None, score=None, probe=None) -> MergePlan:
        if fisher is None:
            raise ValueError("merge strategy 'pm' needs the task's Fisher")
        deltas = vector.deltas
        new = {k: v for k, v in deltas.items() if k not in self.S}  # keys merged for the first time (a shared head
        dtype = getattr(torch, self.accumulator_dtype)  # of domain-incremental tasks from task 2 on)
        self.S.update(zeros_like_dict(new, self.accumulator_device, dtype))
        self.G.update(zeros_like_dict(new, self.accumulator_device, dtype))
        S, G = ({k: acc[k] for k in deltas} for acc in (self.S, self.G))  # keys not merged now keep their sums
        calibration = None
        if self.alpha_calibration != "none":
            fisher, calibration = self.calibrate(deltas, fisher, S, G, probe)
        terms = alpha_terms(deltas, fisher, S, G)
        choices = {}
        for keys in self._groups(deltas):
            part = alpha_terms(*({k: d[k] for k in keys} for d in (deltas, fisher, S, G)))
            choices.update(dict.fromkeys(keys, select_alpha(part, self.alpha_clip, self.alpha_min)))
        if self.alpha_calibration == "curve":
            a = min(max(calibration["alpha"], self.alpha_min), 1.0)
            choices = dict.fromkeys(deltas, AlphaChoice(a, calibration["alpha"]))
        per_key = self.alpha_granularity != "global"
        plan = alpha_plan(vector, choices, terms=terms, per_key=per_key, calibration=calibration)
        new_S, new_G = update_accumulators(deltas, fisher, S, G, plan.alpha)
        self.S.update(new_S)
        self.G.update(new_G)
        return plan

    def state_dict(self):
        return {**{f"S/{k}": v for k, v in self.S.items()}, **{f"G/{k}": v for k, v in self.G.items()}}

    def load_state_dict(self, state):
        device = self.accumulator_device
        self.S = {k: v.to(device or v.device) for k, v in prefixed(state, "S/").items()}
        self.G = {k: v.to(device or v.device) for k, v in prefixed(state, "G/").items()}


@register
class CoFiMA(MergeStrategy):
    name = "cofima"
    reference = (
        "CoFiMA (Marouf et al. 2024): per parameter theta_t = ((1-a) S theta_{t-1} + a F_t theta*_t) / ((1-a) S + "
        "a F_t), S = sum of past Fishers, a = `cofima_weight`"
    )
    knobs = ("cofima_weight", "accumulator_device")
    needs_fisher = True

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.S: dict[str, torch.Tensor] = {}

    @staticmethod
    def check(values) -> None:
        fraction(values, "cofima_weight")

    def merge(self, t, vector, fisher=None, score=None) -> MergePlan:
        if fisher is None:
            raise ValueError("merge strategy 'cofima' needs the task's Fisher")
        deltas = vector.deltas
        self.S.update(zeros_like_dict({k: v for k, v in deltas.items() if k not in self.S}, self.accumulator_device))
        w = {k: cofima_weights(fisher[k], self.S[k].to(fisher[k].device), self.cofima_weight) for k in deltas}
        num = sum(scalar((w[k].double() * deltas[k].double() ** 2).sum()) for k in deltas)
        den = sum(scalar((deltas[k].double() ** 2).sum()) for k in deltas)
        effective = num / den if den > 0 else float(self.cofima_weight)  # alpha along Delta, for the log
        choices = {k: AlphaChoice(effective, effective, weight=w[k]) for k in deltas}
        self.S.update({k: self.S[k] + fisher[k].to(self.S[k].device, self.S[k].dtype) for k in deltas})
        return alpha_plan(vector, choices)

    def state_dict(self):
        return {f"S/{k}": v for k, v in self.S.items()}

    def load_state_dict(self, state):
        self.S = {k: v.to(self.accumulator_device or v.device) for k, v in prefixed(state, "S/").items()}


class Scheduled(MergeStrategy):
    """alpha_t from a schedule over the task count; the variants differ only in `alpha(t)`."""

    def alpha(self, t: int) -> float:
        raise NotImplementedError

    def merge(self, t, vector, fisher=None, score=None) -> MergePlan:
        return alpha_plan(vector, constant(vector.deltas, self.alpha(t)))


@register
class SeqMerge(Scheduled):
    name = "seq-merge"
    shards = True
    reference = "sequential LoRA merged with alpha = 1, a new adapter per task (the paper's 'LoRA' row)"

    def alpha(self, t):
        return 1.0


@register
class Average(Scheduled):
    name = "average"
    shards = True
    reference = "model averaging: theta_hat_t = mean of theta*_i (alpha_t = 1/t)"

    def alpha(self, t):
        return 1.0 / (t + 1)


@register
class SqrtT(Scheduled):
    name = "sqrt-t"
    shards = True
    reference = "alpha_t = 1/sqrt(t), the schedule of OPCM / SLAO (t = 1, 2, ...)"

    def alpha(self, t):
        return 1.0 / math.sqrt(t + 1)


@register
class CoMA(Scheduled):
    name = "coma"
    shards = True
    reference = "CoMA (Marouf et al. 2023): fixed-weight interpolation, alpha = `fixed_alpha`"
    knobs = ("fixed_alpha",)

    @staticmethod
    def check(values) -> None:
        fraction(values, "fixed_alpha")

    def alpha(self, t):
        return float(self.fixed_alpha)


@register
class Joint(Scheduled):
    name = "joint"
    reference = "joint training on all tasks' data at once (the upper bound of the sequence)"

    def transform_stream(self, stream):
        return joint_stream(stream)

    def alpha(self, t):
        return 1.0


@register
class OracleAlpha(MergeStrategy):
    name = "oracle-alpha"
    reference = (
        "upper bound of the closed form: per task, the grid alpha with the best held-out accuracy on all seen tasks "
        "(first best on ties)"
    )
    knobs = ("oracle_grid",)
    needs_score = True

    @staticmethod
    def check(values) -> None:
        grid = values.oracle_grid
        bad = not isinstance(grid, (list, tuple)) or not grid
        if bad or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in grid):
            raise invalid("oracle_grid", grid, "use a non-empty list of numbers in [0, 1], e.g. [0, 0.1, ..., 1].")

    def merge(self, t, vector, fisher=None, score=None) -> MergePlan:
        if t == 0:  # nothing to trade off yet
            return alpha_plan(vector, constant(vector.deltas, 1.0))
        if score is None:
            raise ValueError("merge strategy 'oracle-alpha' needs a score(alpha) function")
        scores = {str(float(a)): score(float(a)) for a in self.oracle_grid}
        best = max(scores.items(), key=lambda item: item[1])[0]  # the first best grid point on ties
        return alpha_plan(vector, constant(vector.deltas, float(best)), oracle_scores=scores)


def joint_stream(stream: TaskStream) -> TaskStream:
    """The whole sequence as ONE task (all classes, all training data): the `joint` upper bound."""

    def concat(parts: list) -> datasets.Dataset:
        joined = datasets.concatenate_datasets(parts)
        fmt = parts[0].format
        if fmt.get("type") == "custom":  # lazy image transforms are not carried by concatenation: re-attach
            joined.set_transform(
                fmt["format_kwargs"]["transform"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"]
            )
        return joined

    tasks = stream.tasks
    task = Task(
        f"joint: {len(tasks)} tasks",
        sorted({c for t in tasks for c in t.classes}),
        concat([t.train for t in tasks]),
        concat([t.eval for t in tasks]),
    )
    return TaskStream([task], stream.num_classes, stream.label_names, stream.modality, stream.collate_fn)
