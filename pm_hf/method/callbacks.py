"""`ContinualCallback`: hooks of the continual loop, the task-level counterpart of `transformers.TrainerCallback`.

The loop calls, for every task t (0-based): `on_task_begin` (theta_hat_{t-1} in place, before the task's start point
and fresh adapter), `on_train_end` (theta*_t: the trained adapter still active), `on_merge` (theta_hat_t written,
adapter zeroed), `on_task_end` (scores done; the callback may add to the task's `log` entry before it is saved) and
`on_save` (after the task's checkpoint is on disk). `trial(t, model, task)` is a context manager around the
measurement of a merge not yet made (the oracle's score of a candidate alpha): a callback that changes the merged
model (head alignment) makes its change inside and undoes it on exit. A callback that keeps something across tasks
returns it from `state_dict()`; it is saved in every checkpoint and handed back by `load_state_dict()` on resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput


class ContinualCallback:
    """Base class: every hook does nothing. `state_key` names the callback's state in checkpoints."""

    state_key: str | None = None  # default: the class name

    def on_task_begin(self, t: int, model: nn.Module, task) -> None:
        """Task t starts; the model holds theta_hat_{t-1}."""

    def on_train_end(self, t: int, model: nn.Module, task) -> None:
        """Task t is trained; the model holds theta*_t (trained adapter active)."""

    def on_merge(self, t: int, model: nn.Module, task) -> None:
        """Task t is merged; the model holds theta_hat_t."""

    def on_task_end(self, t: int, model: nn.Module, log: dict) -> None:
        """Task t is evaluated; `log` is its entry of results.json (add keys to it here)."""

    def on_save(self, t: int, checkpoint_dir: Path) -> None:
        """The checkpoint after task t is on disk."""

    def trial(self, t: int, model: nn.Module, task) -> contextlib.AbstractContextManager:
        """Around a trial merge of task t (weights in place, adapter off): the model as `on_merge` would leave it,
        restored exactly on exit. Default: nothing to do."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)[:3]}")


class CallbackList:
    """Calls a hook on every callback in order, and gathers their states by key."""

    def __init__(self, callbacks: Sequence[ContinualCallback] = ()):
        self.callbacks = list(callbacks)
        keys = [cb.state_key or type(cb).__name__ for cb in self.callbacks]
        self.keys = [k if keys.count(k) == 1 else f"{k}{i}" for i, k in enumerate(keys)]

    def call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    @contextlib.contextmanager
    def trial(self, t: int, model: nn.Module, task):
        """Every callback's `trial`, entered in order and left in reverse."""
        with contextlib.ExitStack() as stack:
            for cb in self.callbacks:
                stack.enter_context(cb.trial(t, model, task))
            yield

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        states = {key: cb.state_dict() for key, cb in zip(self.keys, self.callbacks)}
        return {k: v for k, v in states.items() if v}

    def load_state_dict(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        unknown = set(states) - set(self.keys)
        if unknown:
            raise ValueError(f"the checkpoint holds state of callbacks {sorted(unknown)} that this run does not have")
        for key, cb in zip(self.keys, self.callbacks):
            cb.load_state_dict(states.get(key, {}))


class History(TrainerCallback):
    """Keeps a `TrainerState` of the whole sequence, as `Trainer.state` is kept: every log of the tasks' Trainers
    (training losses, each task's `eval_continual/*` metrics) in `log_history` at the sequence's step."""

    def __init__(self, state: TrainerState):
        self.state, self.train_losses = state, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.state.global_step = max(self.state.global_step, state.global_step)
        self.state.log_history.append({**(logs or {}), "step": state.global_step})
        if logs and "train_loss" in logs:  # the end of a task's training: its mean training loss
            self.train_losses.append(logs["train_loss"])

    def output(self, log: list[dict], mark: int, results: dict) -> ContinualTrainOutput:
        """The `TrainOutput` of a `train()` call that logged the task losses after the first `mark` (`log`: the
        loop's per-task entries): the sequence's step, the step-weighted mean training loss of its tasks, their
        training time and the run's ACC, AAA, BWT and forgetting."""
        losses = self.train_losses[mark:]
        new = log[len(log) - len(losses) :] if losses else []
        steps = [sum(e["branch_counts"].values()) for e in new]
        loss = sum(x * n for x, n in zip(losses, steps)) / max(sum(steps), 1)
        self.state.global_step = sum(sum(e["branch_counts"].values()) for e in log)
        metrics = {"train_loss": loss, "train_runtime": sum(e["timings"]["train"] for e in new)}
        metrics.update({k: results[k] for k in ("acc", "aaa", "bwt", "forgetting") if k in results})
        return ContinualTrainOutput(self.state.global_step, loss, metrics, results)


class ContinualTrainOutput(TrainOutput):
    """What `ContinualTrainer.train()` returns: `TrainOutput(global_step, training_loss, metrics)` as `Trainer.train`'s,
    with `.results` (results.json's content); `output["accuracy_matrix"]` reads `.results` as `train()` returned it
    before."""

    def __new__(cls, global_step: int, training_loss: float, metrics: dict, results: dict | None = None):
        out = super().__new__(cls, global_step, training_loss, metrics)
        out.results = results or {}
        return out

    def __getitem__(self, key):
        return self.results[key] if isinstance(key, str) else super().__getitem__(key)
