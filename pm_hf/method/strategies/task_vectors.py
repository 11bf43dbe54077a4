"""Strategies over task vectors relative to the pretrained weights, tau_i = theta*_i - theta_0:
theta_hat_t = theta_0 + D_t (sequential fine-tuning, task arithmetic, TIES, MagMax). The class head is not part of tau:
its rows are kept as trained."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..merge import LoraFactors, TaskVector, magmax_update, ties_merge, ties_trim
from .base import MergePlan, MergeStrategy, Start, StartPoint, constant, fraction, prefixed, register


class FromPretrained(MergeStrategy):
    """theta_hat_t = theta_0 + D_t, D_t a function of the task vectors tau_i = theta*_i - theta_0 (class head
    excluded: its rows are kept as trained). Set `pretrained` (theta_0) before the first task."""

    start: ClassVar[Start] = "pretrained"

    def taus(self, vector: TaskVector) -> dict[str, torch.Tensor]:
        theta0 = self._theta0()
        return {**vector.lora, **{k: v - theta0[k] for k, v in vector.trained.items()}}

    def combine(self, t: int, taus: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def logged_alpha(self) -> float:
        return float(self.merge_scale)

    def merge(self, context) -> MergePlan:
        D = self.combine(context.t, self.taus(context.vector))
        return MergePlan(D, dict.fromkeys(D, 1.0), constant(D, self.logged_alpha()), origin="pretrained")

    @staticmethod
    def check(values) -> None:
        fraction(values, "merge_scale")


class ContinuedAdapter(FromPretrained):
    """Task t continues training theta*_{t-1}: the same adapter and the fully trained parameters as trained."""

    start: ClassVar[Start] = "chain"

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.adapter: dict[str, LoraFactors] = {}
        self.chain: dict[str, torch.Tensor] = {}

    def start_point(self, t):
        if not self.adapter:
            return StartPoint(dict(self._theta0()))
        return StartPoint({**self._theta0(), **self.chain}, self.adapter)

    def merge(self, context) -> MergePlan:
        self.adapter = dict(context.vector.adapter)
        self.chain = {k: v.clone() for k, v in context.vector.trained.items()}
        return super().merge(context)

    def state_dict(self):
        out = {f"chain/{k}": v for k, v in self.chain.items()}
        for k, f in self.adapter.items():
            out[f"adapter/{k}/A"], out[f"adapter/{k}/B"] = f.A, f.B
            out[f"adapter/{k}/scaling"] = torch.tensor([f.scaling, float(f.fan_in_fan_out)], dtype=torch.float64)
        return out

    def load_state_dict(self, state):
        self.chain = prefixed(state, "chain/")
        keys = {k[8:-2] for k in state if k.startswith("adapter/") and k.endswith("/A")}
        self.adapter = {}
        for k in keys:
            scaling, fan = state[f"adapter/{k}/scaling"].tolist()
            self.adapter[k] = LoraFactors(state[f"adapter/{k}/A"], state[f"adapter/{k}/B"], scaling, bool(fan))


@register
class Sequential(ContinuedAdapter):
    name = "seq"
    reference = "sequential fine-tuning: one LoRA continued through all tasks, never merged (theta_hat_t = theta*_t)"

    @staticmethod
    def check(values) -> None:
        pass

    def logged_alpha(self) -> float:
        return 1.0

    def combine(self, t, taus):
        return {k: v.float() for k, v in taus.items()}


@register
class TaskArithmetic(FromPretrained):
    name = "task-arithmetic"
    reference = "Task arithmetic (Ilharco et al. 2023): independent fine-tunes, theta_0 + lambda * sum_i tau_i"
    knobs = ("merge_scale",)

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.sum: dict[str, torch.Tensor] = {}

    def combine(self, t, taus):
        for k, tau in taus.items():
            self.sum[k] = tau.float().clone() if k not in self.sum else self.sum[k] + tau.float()
        return {k: self.merge_scale * self.sum[k] for k in taus}

    def state_dict(self):
        return {f"sum/{k}": v for k, v in self.sum.items()}

    def load_state_dict(self, state):
        self.sum = prefixed(state, "sum/")


@register
class Ties(FromPretrained):
    name = "ties"
    reference = (
        "TIES-merging (Yadav et al. 2023): trim to `ties_density` per tensor, elect sign, disjoint mean, times "
        "lambda; keeps every trimmed task vector (memory grows with t)"
    )
    knobs = ("merge_scale", "ties_density")

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.trimmed: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def check(values) -> None:
        fraction(values, "merge_scale")
        fraction(values, "ties_density", lo_open=True)

    def combine(self, t, taus):
        self.trimmed.append({k: ties_trim(tau.float(), self.ties_density) for k, tau in taus.items()})
        return {k: self.merge_scale * ties_merge([task[k] for task in self.trimmed]) for k in taus}

    def state_dict(self):
        return {f"tau{i}/{k}": v for i, task in enumerate(self.trimmed) for k, v in task.items()}

    def load_state_dict(self, state):
        count = len({k.split("/", 1)[0] for k in state})
        self.trimmed = [
            {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"tau{i}/")} for i in range(count)
        ]


@register
class MagMax(ContinuedAdapter):
    name = "magmax"
    reference = (
        "MagMax (Marczak et al. 2024): sequential fine-tuning, per parameter the cumulative task vector entry of "
        "largest magnitude, times lambda"
    )
    knobs = ("merge_scale",)

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.max: dict[str, torch.Tensor] = {}

    def combine(self, t, taus):
        for k, tau in taus.items():
            self.max[k] = magmax_update(self.max.get(k), tau)
        return {k: self.merge_scale * self.max[k] for k in taus}

    def state_dict(self):
        return {**super().state_dict(), **{f"max/{k}": v for k, v in self.max.items()}}

    def load_state_dict(self, state):
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("max/")})
        self.max = prefixed(state, "max/")
