"""OSF (Orthogonal Subspace Fine-tuning, Nayak et al. 2025, arXiv:2504.07097) as PEFT ships it (`peft.OSFConfig`),
continued across tasks as PEFT's docs describe for continual learning: before every task the SVD of the current
weights is recomputed (PEFT's "re-wrap the updated base model") and the preserved subspace grows with the task budget
of the docs' "Budget Allocation for Task Sequences" (task t of T, 0-based, preserves the top t/T of each weight's
singular directions, at least one); the task trains inside it and its update joins the weights as trained (PEFT's
`merge_and_unload`; no alpha). The continual model is the adapter as trained, on the same projections LoRA adapts."""

from __future__ import annotations

import torch

from ...config.checks import invalid
from ..adapters_osf import unwrap_osf, wrap_osf
from ..callbacks import ContinualCallback
from ..merge import AlphaChoice
from .base import MergePlan, MergeStrategy, register


def preserved_fraction(t: int, num_tasks: int) -> float:
    """The docs' budget: task t (0-based) of `num_tasks` preserves t / num_tasks of each weight's rank."""
    return t / num_tasks


class OSFTraining(ContinualCallback):
    """Wraps the LoRA-adapted layers in PEFT's OSF layers when a task begins (the SVD of theta_hat_{t-1}); the
    strategy's merge takes them out again."""

    def __init__(self, stream):
        self.stream, self.model = stream, None
        self.ranks: dict[str, int] = {}  # the preserved rank of every layer in the current task

    def on_task_begin(self, t, model, task) -> None:
        self.model = model
        self.ranks = wrap_osf(model, preserved_fraction(t, len(self.stream.tasks)))


@register
class OSF(MergeStrategy):
    name = "osf"
    reference = (
        "OSF (Nayak et al. 2025, PEFT's OSFConfig): full-rank updates of the adapted projections orthogonal to the "
        "top singular directions of the previous weights, the preserved rank growing t/T per task; merged as trained"
    )

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.training: OSFTraining | None = None

    def check_training(self, args) -> None:
        """A mid-task Trainer checkpoint holds the LoRA adapter and the head, not OSF's factors: a task resumed from
        one would restart OSF from its SVD with the optimizer's later state. Checkpoints come once per task. The P&M
        perturbation scales the LoRA adapter, which OSF leaves frozen at zero: refused rather than silently void."""
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        if strategy != "no":
            fix = "osf keeps no mid-task Trainer checkpoint (its factors are not in one): use `save_strategy: no` "
            raise invalid("save_strategy", strategy, fix + "(pm_hf checkpoints after every task).")
        if args.perturbation != "none" and args.perturb_eps != 0:  # it would scale the frozen, zero LoRA adapter
            fix = "osf trains OSF's factors, not the LoRA adapter the perturbation scales: use `perturbation: none`."
            raise invalid("perturbation", args.perturbation, fix)

    def callbacks(self, stream) -> list:
        self.training = OSFTraining(stream)
        return [self.training]

    def merge(self, context) -> MergePlan:
        if self.training is None or self.training.model is None:
            raise ValueError("merge strategy 'osf' trains through its callbacks: assemble the run with `callbacks()`")
        osf = unwrap_osf(self.training.model)
        if not osf:
            raise invalid("merge_method", self.name, "the model has no OSF layers: task training did not wrap them.")
        deltas = {**context.vector.deltas, **osf}  # the (frozen, zero) LoRA deltas replaced by OSF's
        # alpha 1, as a tensor: the update is dense, not the adapter's factors (no low-rank export record)
        alpha = {k: torch.ones(()) if k in osf else 1.0 for k in deltas}
        return MergePlan(deltas, alpha, dict.fromkeys(deltas, AlphaChoice(1.0, 1.0)))
