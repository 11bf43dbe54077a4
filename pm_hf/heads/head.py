"""The class head: one output row per class of the whole stream, a logit mask so that training sees only the current
task's classes (class-incremental) and evaluation predicts over all seen classes or the task's own (task-incremental),
and which head rows are merged; the head alignment remedies are `pm_hf.heads.alignment`.

Heads in the merge (docs/method.md, "Which parameters"): rows of classes first trained in task t are taken as trained
(not merged, not scaled by alpha); rows of classes not in task t are restored exactly; rows of classes trained before
AND now (domain-incremental) are merged like any other parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..distributed.placement import Replicated, placement_of
from ..method.adapters import strip_prefix, unwrap


def find_head(model: nn.Module, num_labels: int) -> tuple[str, nn.Linear]:
    """The last linear layer with one output per class, and its name relative to the base model."""
    found = [
        (n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels
    ]
    if not found:
        raise ValueError(f"no linear layer with {num_labels} outputs (the classification head) found in the model.")
    name, module = found[-1]
    return strip_prefix(name), module


class ClassMask:
    """Masks the head's logits to the `active` classes (others get the dtype's minimum: zero probability, no grad).

    `active=None` disables the mask. Because the mask acts on the head's output, the model's own loss, the Fisher and
    the predictions all see the same restricted logits.
    """

    def __init__(self, head: nn.Module, num_labels: int):
        self.num_labels = num_labels
        self.mask: torch.Tensor | None = None
        self.handle = head.register_forward_hook(self._hook)

    def set_active(self, classes: Iterable[int] | None) -> None:
        if classes is None:
            self.mask = None
            return
        mask = torch.zeros(self.num_labels, dtype=torch.bool)
        mask[list(classes)] = True
        self.mask = mask

    def _hook(self, module, args, output):
        if self.mask is None:
            return output
        return output.masked_fill(~self.mask.to(output.device), torch.finfo(output.dtype).min)


class Head:
    """The classifier's head in the loop: its name and module, the logit mask and the merge policy of its rows."""

    def __init__(self, model: nn.Module, num_classes: int, domain_incremental: bool = False):
        self.name, self.module = find_head(model, num_classes)
        self.model = model
        self.num_classes = num_classes
        self.mask = ClassMask(self.module, num_classes)
        self.domain_incremental = domain_incremental

    @property
    def modules(self) -> list[str]:
        return [self.name]

    def owns(self, key: str) -> bool:
        return key.startswith(self.name + ".")

    @property
    def placement(self) -> Replicated:
        """Where the model's weights live (`pm_hf.distributed.placement`)."""
        return placement_of(self.model)

    def parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's weight and bias (or None) as pm_hf reads and writes them (the placement's `as_rows`)."""
        bias, as_rows = self.module.bias, self.placement.as_rows
        return as_rows(self.module.weight), None if bias is None else as_rows(bias)

    def set_active(self, classes: Iterable[int] | None) -> None:
        self.mask.set_active(classes)

    def train_classes(self, task) -> list[int] | None:
        """The logits the task trains over: its classes, or all of them (domain-incremental: one label set)."""
        return None if self.domain_incremental else task.classes

    def merged_delta(self, delta: torch.Tensor, task, seen_before: set[int]) -> torch.Tensor | None:
        """The part of a head parameter's change that is merged: rows of classes trained before AND now."""
        rows = sorted(set(task.classes) & seen_before)
        if not rows:
            return None  # class-/task-incremental: new rows are taken as trained, old rows are untouched
        return self.placement.keep_rows(delta, rows)  # split by rows: each rank its own

    def fit_saved(self, saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict:
        """Saved head tensors with fewer rows than the head (tasks with new classes were appended since) get the
        head's current rows beyond theirs; every other tensor is returned as saved."""
        out = dict(saved)
        for key, value in current.items():
            old = saved.get(key)
            if self.owns(key) and old is not None and old.shape[1:] == value.shape[1:] and len(old) < len(value):
                new_rows = self.placement.whole(value.detach())[len(old) :]  # gathered where split (every rank calls)
                out[key] = torch.cat([old, new_rows.to(old.device, old.dtype)])
        return out

    def grow(self, model: nn.Module, num_classes: int, fresh: nn.Linear | None = None) -> None:
        """Give the head one row per class up to `num_classes`: old rows kept, new rows from `fresh` (a newly
        initialised head of the new size, e.g. from reloading the model) or the module's default initialisation."""
        old = self.module
        if num_classes <= old.out_features:
            return
        new = placement_of(model).grown(old, lambda: _grown(old, num_classes, fresh), num_classes)
        base = unwrap(model)
        base = getattr(base, "get_base_model", lambda: base)()
        parent, _, child = self.name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, new)
        if hasattr(base, "num_labels"):  # the classifier's loss reshapes its logits with it
            base.num_labels = num_classes
        base.config.num_labels = num_classes
        self.mask.handle.remove()
        self.module, self.num_classes, self.mask = new, num_classes, ClassMask(new, num_classes)

    def restore_untouched(self, params: Mapping[str, nn.Parameter], before: Mapping[str, torch.Tensor], task) -> None:
        """Rows of classes not in the task get their values from `before` back, exactly."""
        untouched = [c for c in range(self.num_classes) if c not in task.classes]
        if not untouched:
            return
        with torch.no_grad():
            for key, param in params.items():
                if self.owns(key):
                    self.placement.copy_rows(param, before[key], untouched)


def _grown(old: nn.Linear, num_classes: int, fresh: nn.Linear | None) -> nn.Linear:
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device)
    new.to(old.weight.dtype)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(old, name) is None:
                continue
            target = getattr(new, name)
            if fresh is not None:
                target.copy_(getattr(fresh, name).to(target.device, target.dtype))
            target[: old.out_features] = getattr(old, name)
            target.requires_grad_(getattr(old, name).requires_grad)
    return new


class NoHead:
    """Causal LMs: no class head, no mask, nothing to restore."""

    modules: list[str] = []

    def owns(self, key: str) -> bool:
        return False

    def set_active(self, classes) -> None:
        pass

    def train_classes(self, task) -> None:
        return None

    def merged_delta(self, delta, task, seen_before):
        return delta

    def restore_untouched(self, params, before, task) -> None:
        pass

    def fit_saved(self, saved, current) -> dict:
        return dict(saved)
