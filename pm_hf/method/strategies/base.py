"""Merge strategies, one class each (in the style of mergekit's merge methods): a strategy owns its knobs (checked by
itself), its reference, whether it needs the Fisher or a held-out score, where task t's training starts, how the
trained task is merged, and what it keeps across tasks (`state_dict()` / `load_state_dict()`). The loop never names
a strategy; a new baseline is one class here, registered with `@register`.

Every `merge(context)` gets a `MergeContext` (`context.py`: t, the task vector, and on demand the Fisher, the
oracle's score and the calibration probe) and returns a `MergePlan`: theta_hat_t = origin + alpha * deltas, key by
key, where the origin is the previous merged model theta_hat_{t-1} or the pretrained weights theta_0. `merge_task`
applies a plan to a model.

This module holds the base class, the registry and `merge_task`; `alpha.py` the strategies that merge
theta_hat_{t-1} + alpha * Delta_t, `task_vectors.py` those that combine task vectors relative to theta_0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ...config.checks import check_number, invalid
from ...config.groups import MergeArguments
from ..adapters import modules_fixed, zero_adapter
from ..merge import (
    AlphaChoice,
    AlphaTerms,
    LoraFactors,
    TaskVector,
)
from ..weights import LowRankWeights, ModelWeights
from .context import MergeContext, Score
from .knobs import (
    Knob,
    KnobValues,
    check_parameters,
    declared_values,
    default_knobs,
    knob_names,
    read_knobs,
    registrar,
)

Start = Literal["merged", "pretrained", "chain"]


@dataclass
class MergePlan:
    """theta_hat_t[k] = origin[k] + alpha[k] * deltas[k]; `choices` is what is logged per key (alpha, raw, fallback)."""

    deltas: dict[str, torch.Tensor]
    alpha: dict[str, float | torch.Tensor]
    choices: dict[str, AlphaChoice]
    origin: Literal["previous", "pretrained"] = "previous"
    terms: AlphaTerms | None = None  # the closed form's sums (strategies that compute them)
    per_key: bool = False  # log one alpha per key (per-module ablation)
    oracle_scores: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None  # what a calibrated closed form measured (kappa, losses, curve)

    @property
    def choice(self) -> AlphaChoice:
        """The logged alpha of the task (the first key's; all keys share it unless `per_key`)."""
        return next(iter(self.choices.values()))

    @property
    def low_rank(self) -> bool:
        """Whether theta_hat_t - theta_hat_{t-1} is alpha * s B A exactly (one float alpha per key, previous origin):
        then the task's adapter factors are the exact export record."""
        return self.origin == "previous" and all(not isinstance(a, torch.Tensor) for a in self.alpha.values())


@dataclass
class TaskProbe:
    """Measurements of the trained task for the calibrated closed forms (strategies with `needs_probe`): its loss
    along the merge line theta_hat_{t-1} + alpha Delta_t (adapter off, the task's training mask, eval mode) on a sample
    of its training data and on its held-out part, and the perturbation's late branch losses."""

    loss: Score | None = None  # alpha -> mean loss on the task's training sample (the Fisher's)
    heldout_loss: Score | None = None  # alpha -> mean loss on the held-out part of the task's training data
    branch_losses: dict[int, float | None] = field(default_factory=dict)
    eps: float = 0.0  # the perturbation's epsilon (branch b = -1 trains at 1 - eps)


@dataclass
class StartPoint:
    """Where task t trains from when it is not theta_hat_{t-1} with a fresh adapter."""

    weights: dict[str, torch.Tensor]  # merge key -> value to load before training
    adapter: dict[str, LoraFactors] | None = None  # factors to continue from (None: a fresh adapter)


class MergeStrategy:
    """Base class. Subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    knobs: ClassVar[tuple[str | Knob, ...]] = ()  # the `MergeArguments` fields it reads, or `Knob`s it declares
    needs_fisher: ClassVar[bool] = False
    needs_score: ClassVar[bool] = False  # score(alpha): held-out accuracy of theta_hat_{t-1} + alpha Delta
    needs_probe: ClassVar[bool] = False  # a `TaskProbe` of the trained task (the calibrated closed forms)
    needs_validation: ClassVar[bool] = False  # estimate(alpha) of the seen accuracy from training data only
    holdout_field: ClassVar[str] = "calibration_holdout"  # the knob that sets `holdout` (named in its errors)
    revisits_first_merge: bool = False  # the head alignment keeps the first task's statistics under theta_0
    old_width: str | None = None  # the head alignment records each class's width factor (`validated-alpha`)
    shards: ClassVar[bool] = False  # its math is elementwise plus global sums: runs on FSDP-sharded weights
    holdout: ClassVar[float] = 0.0  # the fraction of each task's training data held out for the probe
    start: ClassVar[Start] = "merged"

    def __init__(self, **knobs):
        names = knob_names(type(self))
        unknown = set(knobs) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__} takes the knobs {names}, not {sorted(unknown)}")
        values = {**default_knobs(type(self)), **knobs}
        for name in names:
            setattr(self, name, values[name])
        self.check(self)
        self.pretrained: dict[str, torch.Tensor] | None = None

    @classmethod
    def parameters(cls) -> tuple[str | Knob, ...]:
        """The knobs it reads (mergekit's `parameters()`): its own `knobs` unless it takes others' too."""
        return cls.knobs

    @classmethod
    def from_args(cls, args: MergeArguments) -> MergeStrategy:
        return cls(**read_knobs(cls, args))

    @staticmethod
    def check(values) -> None:
        """Raise `ValueError` naming field, value and fix for a bad knob; `values` has the knobs as attributes."""

    @property
    def needs_pretrained(self) -> bool:
        return self.start != "merged"

    def transform_stream(self, stream):
        """The task stream this strategy trains on (the identity, except for `joint`)."""
        return stream

    def start_point(self, t: int) -> StartPoint | None:
        """Where task t (0-based) trains from; None: theta_hat_{t-1} with a fresh adapter."""
        if self.start == "merged":
            return None
        return StartPoint(dict(self._theta0()))

    def check_training(self, args) -> None:
        """Raise `invalid(field, value, fix)` for training arguments the strategy cannot train with (checked before
        the model is loaded). Default: any."""

    def callbacks(self, stream) -> list:
        """What the strategy adds to the run's training (assembled with the run's callbacks): `ContinualCallback`s for
        the loop's hooks, `TrainerCallback`s (e.g. a `pm_hf.method.trainer.LossTerm`) for every task's Trainer;
        `stream` is the run's task stream (tasks added later join its `tasks`)."""
        return []

    def merge(self, context: MergeContext) -> MergePlan:
        """Task `context.t`'s plan; ask `context` for the Fisher, the score or the probe only when the rule needs it."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(
                f"merge strategy {self.name!r} keeps no state, but the checkpoint holds {sorted(state)[:3]}"
            )

    def _theta0(self) -> dict[str, torch.Tensor]:
        if self.pretrained is None:
            raise ValueError(f"merge strategy {self.name!r} needs the pretrained weights: set `strategy.pretrained`.")
        return self.pretrained


STRATEGIES: dict[str, type[MergeStrategy]] = {}
RETIRED = {"fixed": "'fixed' is the same rule as 'coma': use `merge_method: coma` with `fixed_alpha`"}


register = registrar(STRATEGIES, "merge strategy")  # `@register`: the class is `merge_method: <cls.name>`


def get_strategy(name: str) -> type[MergeStrategy]:
    if name in RETIRED:
        raise invalid("merge_method", name, RETIRED[name] + ".")
    if name not in STRATEGIES:
        raise invalid("merge_method", name, f"use one of {sorted(STRATEGIES)}.")
    return STRATEGIES[name]


def check_merge_args(args: MergeArguments) -> None:
    """Every knob of `args` checked by the strategy that owns it (declared ones under `merge_parameters` too), and the
    strategy name itself."""
    cls = get_strategy(args.merge_method)
    check_parameters(args)
    values = KnobValues(args)
    for other in STRATEGIES.values():
        other.check(values)
    if args.merge_into == "adapter":
        strategy = cls.from_args(args)
        if strategy.needs_pretrained or strategy.needs_score or strategy.needs_probe:
            fix = "is not available with a merged adapter (merge_into: adapter): use pm, coma, average, seq-merge or "
            fix += "sqrt-t."
            raise invalid("merge_method", args.merge_method, fix)


def resolved_knobs(args: MergeArguments) -> dict:
    """The declared knobs of `args.merge_method` as this pm_hf resolves them (`merge_parameters` over the defaults),
    JSON-safe: a run record's `merge_knobs`."""
    return json.loads(json.dumps(declared_values(get_strategy(args.merge_method), args), default=str))


def build_strategy(args: MergeArguments) -> MergeStrategy:
    """The strategy `args.merge_method` with its knobs from `args` (all knobs of `args` checked first)."""
    check_merge_args(args)
    return get_strategy(args.merge_method).from_args(args)


def fraction(values, name: str, lo_open: bool = False) -> None:
    """Knob `name` of `values` is a number in [0, 1] ((0, 1] when `lo_open`)."""
    check_number(name, getattr(values, name), 0, 1, low_open=lo_open)


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state dict under `prefix`, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def constant(keys, a: float) -> dict[str, AlphaChoice]:
    choice = AlphaChoice(float(a), float(a))
    return dict.fromkeys(keys, choice)


def alpha_plan(vector: TaskVector, choices: dict[str, AlphaChoice], **kw) -> MergePlan:
    return MergePlan(vector.deltas, {k: c.value for k, c in choices.items()}, choices, **kw)


# ------------------------------------------------------------------------------------------------ applying
def merge_task(
    weights: ModelWeights,
    strategy: MergeStrategy,
    context: MergeContext | int,
    vector: TaskVector | None = None,
    before: Mapping[str, torch.Tensor] | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
    score: Score | None = None,
    probe: TaskProbe | None = None,
) -> MergePlan:
    """Merge task t (0-based) into the model: the strategy's plan, written through `weights`, then the adapter
    zeroed (theta_hat_t now lives in the base weights; a fresh adapter starts the next task).

    Args:
        weights: the model's `ModelWeights` (one per run: it keeps the fp32 master copies).
        strategy: the merge strategy (keeps its own state across tasks).
        context: the task's `MergeContext` (the loop's computes the Fisher, score and probe on demand), or the task
            index t with the context's parts given as values: `vector`, `fisher`, `score`, `probe`.
        vector: the task's `TaskVector` (`weights.task_vector(before, ...)` right after training).
        before: fp32 values of the fully trained parameters when the task started (their theta_hat_{t-1}).
        fisher: the task's diagonal Fisher over `vector.deltas` (strategies with `needs_fisher`).
        score: score(alpha) for strategies with `needs_score`.
        probe: the task's `TaskProbe` for strategies with `needs_probe`.

    Returns:
        The applied `MergePlan` (alpha per key, what was logged, the closed form's terms).
    """
    if not isinstance(context, MergeContext):
        context = MergeContext(context, vector, fisher=fisher, score=score, probe=probe)
    elif any(x is not None for x in (vector, fisher, score, probe)):  # a context holds them: `before` is by keyword
        raise TypeError("merge_task with a MergeContext takes `before=` by keyword and no vector, fisher, score, probe")
    vector = context.vector
    plan = strategy.merge(context)
    base = strategy.pretrained if plan.origin == "pretrained" else before
    with modules_fixed(weights.model):  # one walk over the modules, after the strategy's (osf rewraps layers)
        if isinstance(weights, LowRankWeights):  # a base that cannot be written: the LoRA deltas join a merged adapter
            if not plan.low_rank:
                fix = "a quantized base keeps its merges as a low-rank adapter: use a strategy with one alpha per task."
                raise invalid("merge_method", strategy.name, fix)
            weights.append(vector.adapter, plan.alpha)
            dense = {k: d for k, d in plan.deltas.items() if k not in vector.adapter}
            weights.apply(dense, {k: plan.alpha[k] for k in dense}, base=base)
        else:
            weights.apply(plan.deltas, plan.alpha, base=base)
        zero_adapter(weights.model)
    return plan
