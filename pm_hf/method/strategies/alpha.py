"""Strategies that merge theta_hat_t = theta_hat_{t-1} + alpha_t * Delta_t (alpha a float or, for CoFiMA, a
per-parameter weight): the closed form of P&M, CoFiMA, alpha schedules and the oracle."""

from __future__ import annotations

import math

import datasets
import torch

from ...config.checks import check_choice, check_number, invalid
from ...data.streams import Task, TaskStream
from ...distributed.sharding import scalar
from ..merge import (
    AlphaChoice,
    accumulator_updates,
    alpha_terms_by_key,
    cofima_weights,
    select_alpha,
    sum_terms,
    zeros_like_dict,
)
from .base import MergePlan, MergeStrategy, alpha_plan, constant, fraction, prefixed, register
from .calibration import CALIBRATIONS, calibration_knobs, get_calibration
from .knobs import Knob, knob_names


@register
class ClosedForm(MergeStrategy):
    name = "pm"
    shards = True
    reference = "Qiu et al. 2025, Perturb-and-Merge: closed-form alpha over the S/G accumulators (docs/method.md)"
    knobs = ("alpha_clip", "alpha_min", "alpha_granularity", "accumulator_device", "accumulator_dtype",
             "alpha_calibration")  # fmt: skip
    needs_fisher = True

    def __init__(self, **knobs):
        super().__init__(**knobs)
        calibration = get_calibration(self.alpha_calibration)
        self.calibration = calibration(**{name: getattr(self, name) for name in knob_names(calibration)})
        self.S: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}

    @classmethod
    def parameters(cls):
        return (*cls.knobs, *calibration_knobs())  # the chosen calibration's knobs come with the strategy's

    @property
    def needs_probe(self) -> bool:
        return self.calibration.needs_probe

    @property
    def holdout(self) -> float:
        return self.calibration.holdout

    @staticmethod
    def check(values) -> None:
        if not isinstance(values.alpha_clip, bool):
            raise invalid("alpha_clip", values.alpha_clip, "use true or false.")
        fraction(values, "alpha_min")
        check_choice("alpha_granularity", values.alpha_granularity, ("global", "module"))
        check_choice("alpha_calibration", values.alpha_calibration, tuple(CALIBRATIONS))
        check_choice("accumulator_dtype", values.accumulator_dtype, ("float32", "bfloat16"))
        for calibration in CALIBRATIONS.values():  # each checks its own knobs, also when another is chosen
            calibration.check(values)

    def _groups(self, keys) -> list[list[str]]:
        if self.alpha_granularity == "global":
            return [list(keys)]
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
        return list(groups.values())

    def merge(self, context) -> MergePlan:
        vector, fisher = context.vector, context.fisher
        if fisher is None:
            raise ValueError("merge strategy 'pm' needs the task's Fisher")
        deltas = vector.deltas
        new = {k: v for k, v in deltas.items() if k not in self.S}  # keys merged for the first time (a shared head
        dtype = getattr(torch, self.accumulator_dtype)  # of domain-incremental tasks from task 2 on)
        self.S.update(zeros_like_dict(new, self.accumulator_device, dtype))
        self.G.update(zeros_like_dict(new, self.accumulator_device, dtype))
        S, G = ({k: acc[k] for k in deltas} for acc in (self.S, self.G))  # keys not merged now keep their sums
        fisher, calibration = self.calibration.calibrate(context, deltas, fisher)  # kappa_t F_t
        by_key = alpha_terms_by_key(deltas, fisher, S, G)  # one pass; it also checks the four dicts finite
        terms = sum_terms(by_key.values())
        choices = {}
        for keys in self._groups(deltas):
            part = sum_terms(by_key[k] for k in keys)
            choices.update(dict.fromkeys(keys, select_alpha(part, self.alpha_clip, self.alpha_min)))
        chosen = self.calibration.choose(deltas, S, G, calibration, self.alpha_min)
        if chosen is not None:  # a calibration that measures alpha itself (the held-out curve)
            choices = dict.fromkeys(deltas, chosen)
        per_key = self.alpha_granularity != "global"
        plan = alpha_plan(vector, choices, terms=terms, per_key=per_key, calibration=calibration)
        # key by key, in place where they can be (else each old S and G let go as its new one is made): never both
        # whole sets at once, the merge's peak
        for key, s, g in accumulator_updates(deltas, fisher, S, G, plan.alpha, checked=True, in_place=True):
            self.S[key] = S[key] = s
            self.G[key] = G[key] = g
        return plan

    def state_dict(self):
        """S and G, the live tensors (as `nn.Module.state_dict`: the next merge updates them in place)."""
        return {**{f"S/{k}": v for k, v in self.S.items()}, **{f"G/{k}": v for k, v in self.G.items()}}

    def load_state_dict(self, state):
        """Copies of `state`'s S and G (the caller's tensors are never updated by a later merge)."""
        device = self.accumulator_device
        self.S = {k: v.to(device or v.device, copy=True) for k, v in prefixed(state, "S/").items()}
        self.G = {k: v.to(device or v.device, copy=True) for k, v in prefixed(state, "G/").items()}


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

    def merge(self, context) -> MergePlan:
        vector, fisher = context.vector, context.fisher
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

    def merge(self, context) -> MergePlan:
        return alpha_plan(context.vector, constant(context.vector.deltas, self.alpha(context.t)))


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
    knobs = (
        "oracle_grid",
        Knob(
            "oracle_first_alpha",
            1.0,
            lambda name, value: check_number(name, value, 0, 1),
            "the first task's alpha (nothing seen to trade off, nothing scored): 1, or a rule's first alpha to bound "
            "the merges after it",
        ),
    )
    needs_score = True

    @staticmethod
    def check(values) -> None:
        grid = values.oracle_grid
        bad = not isinstance(grid, (list, tuple)) or not grid
        if bad or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in grid):
            raise invalid("oracle_grid", grid, "use a non-empty list of numbers in [0, 1], e.g. [0, 0.1, ..., 1].")

    def merge(self, context) -> MergePlan:
        vector = context.vector
        if context.t == 0:  # nothing to trade off yet (and nothing is scored)
            return alpha_plan(vector, constant(vector.deltas, float(self.oracle_first_alpha)))
        score = context.score
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
