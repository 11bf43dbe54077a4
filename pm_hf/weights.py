"""theta_hat as the model holds it: `ModelWeights`, the one writer of merged weights (an fp32 master copy of every
written tensor when the model is not fp32), its snapshots and checkpointed state, and the task vector read from the
trained adapter. Merge keys are those of `pm_hf.adapters`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .adapters import adapter_factors, base_weights, full_trainable_params, lora_task_vector, strip_prefix, unwrap
from .checks import NonFiniteError, check_finite
from .merge import TaskVector


class ModelWeights:
    """theta_hat as the model holds it, and the only writer of merged weights: LoRA keys live in the adapted layers'
    base weights, the other keys are the fully trained parameters (heads, `modules_to_save`).

    When the model's weights are not fp32, an fp32 master copy of every written tensor is kept (on `device`) and the
    model's weight is re-cast from it after every write, so many merges do not accumulate rounding.
    """

    def __init__(self, model: nn.Module, device: str | None = None):
        self.model = model
        self.device = device
        self.master: dict[str, torch.Tensor] = {}

    def full(self) -> dict[str, nn.Parameter]:
        """The fully trained parameters, by merge key."""
        return full_trainable_params(self.model)

    def targets(self, keys) -> dict[str, torch.Tensor]:
        """The tensor each merge key writes to (LoRA key: the base layer's weight)."""
        layers = base_weights(self.model)
        params = {strip_prefix(n): p for n, p in unwrap(self.model).named_parameters()}
        out = {}
        for key in keys:
            if key not in layers and key not in params:
                raise ValueError(f"merge key {key!r} is neither a LoRA layer nor a parameter of the model.")
            out[key] = layers[key] if key in layers else params[key]
        return out

    def value(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The exact value of a written tensor: its fp32 master copy if one is kept, else the tensor itself."""
        return self.master.get(key, tensor.detach())

    def state(self) -> dict[str, torch.Tensor]:
        """theta_hat as checkpointed: every adapted layer's merged weight and every fully trained parameter."""
        out = {k: self.value(k, w) for k, w in base_weights(self.model).items()}
        out.update({k: p.detach() for k, p in self.full().items()})
        return out

    def snapshot(self, exclude: Callable[[str], bool] = lambda key: False) -> dict[str, torch.Tensor]:
        """fp32 copies of the adapted layers' weights and the fully trained parameters (keys `exclude` rejects are
        left out): the pretrained theta_0 when taken right after loading."""
        out = {k: self.value(k, w).float().clone() for k, w in base_weights(self.model).items() if not exclude(k)}
        out.update({k: p.detach().float().clone() for k, p in self.full().items() if not exclude(k)})
        return out

    def restore(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Write `weights` (merge key -> value) into the model exactly; master copies follow."""
        targets = self.targets(weights)
        for key, value in weights.items():
            if targets[key].shape != value.shape:
                raise ValueError(f"{key!r}: value of shape {tuple(value.shape)}, weight {tuple(targets[key].shape)}")
        with torch.no_grad():
            for key, value in weights.items():
                if targets[key].dtype != torch.float32:
                    self.master[key] = value.float().to(self.device or targets[key].device)
                targets[key].copy_(value.to(targets[key].device, targets[key].dtype))

    def load_state(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Restore a checkpointed `state()` exactly: the same keys and shapes, or nothing is written."""
        expected = self.targets(self.state())
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or extra:
            raise ValueError(
                f"the checkpoint's weights do not match the model: missing {missing[:3]}, extra {extra[:3]}"
            )
        self.restore(weights)

    def apply(
        self,
        deltas: Mapping[str, torch.Tensor],
        alpha: Mapping[str, float | torch.Tensor],
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Set each key to base + alpha * delta; `base` defaults per key to the current value (its master copy if
        any); alpha is a float or a per-parameter tensor per key. Every key is checked before any is written."""
        targets = self.targets(deltas)
        for key, delta in deltas.items():
            a = alpha.get(key)
            finite = a is not None and (
                bool(torch.isfinite(a).all()) if isinstance(a, torch.Tensor) else math.isfinite(a)
            )
            if not finite:
                raise NonFiniteError(f"no finite alpha for merge key {key!r}; nothing was written.")
            if targets[key].shape != delta.shape:
                raise ValueError(
                    f"delta for {key!r} has shape {tuple(delta.shape)}, weight {tuple(targets[key].shape)}"
                )
        new_value = lambda key: self._merged(targets[key], key, deltas[key], alpha[key], base)  # noqa: E731
        with torch.no_grad():
            for key in deltas:  # every new value is checked before any is written
                check_finite({key: new_value(key)}, "merged weights")
            for key in deltas:
                weight, new = targets[key], new_value(key)
                if weight.dtype != torch.float32:
                    self.master[key] = new.to(self.device or weight.device)
                weight.copy_(new.to(weight.device, weight.dtype))

    def _merged(self, weight, key: str, delta: torch.Tensor, a, base) -> torch.Tensor:
        start = base[key].float() if base is not None and key in base else self.value(key, weight).float()
        a = a.to(delta.device) if isinstance(a, torch.Tensor) else a
        return start.to(delta.device) + a * delta.float()

    def task_vector(
        self,
        before: Mapping[str, torch.Tensor],
        is_head: Callable[[str], bool] = lambda key: False,
        head_delta: Callable[[str, torch.Tensor], torch.Tensor | None] = lambda key, delta: None,
    ) -> TaskVector:
        """The trained adapter's Delta W and the fully trained parameters' change since `before`.

        Args:
            before: fp32 values of the fully trained parameters when the task started (`snapshot`).
            is_head: whether a key belongs to the class head (left out of `trained`).
            head_delta: the merged part of a head key's change, or None when nothing of it is merged.
        """
        lora = lora_task_vector(self.model, self.device)
        full, trained = {}, {}
        for key, param in self.full().items():
            delta = param.detach().float() - before[key]
            if is_head(key):
                delta = head_delta(key, delta)
            else:
                trained[key] = param.detach().float().clone()
            if delta is not None:
                full[key] = delta
        return TaskVector(lora, full, trained, adapter_factors(self.model))
