"""theta_hat as the model holds it: `ModelWeights`, the one writer of merged weights (an fp32 master copy of every
written tensor when the model is not fp32), its snapshots and checkpointed state, and the task vector read from the
trained adapter. Merge keys are those of `pm_hf.method.adapters`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..config.checks import NonFiniteError, check_finite
from ..distributed.placement import Replicated, placement_of
from ..distributed.sharding import Scratch
from .adapters import (
    adapter_factors,
    base_weights,
    full_trainable_params,
    lora_layers,
    lora_task_vector,
    merged_delta_hooks,
    modules_fixed,
    named_params,
)
from .merge import LoraFactors, TaskVector, compress_factors


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

    @property
    def placement(self) -> Replicated:
        """Where the model's weights live (`pm_hf.distributed.placement`), chosen when the run was assembled."""
        return placement_of(self.model)

    def trained_params(self) -> dict[str, nn.Parameter]:
        """The fully trained parameters (heads, `modules_to_save`), by merge key."""
        return full_trainable_params(self.model)

    def targets(self, keys, placement: Replicated | None = None) -> dict[str, torch.Tensor]:
        """The tensor each merge key writes to (LoRA key: the base layer's weight)."""
        layers, params = base_weights(self.model), named_params(self.model)
        as_rows, out = (self.placement if placement is None else placement).as_rows, {}
        for key in keys:
            if key not in layers and key not in params:
                raise ValueError(f"merge key {key!r} is neither a LoRA layer nor a parameter of the model.")
            out[key] = layers[key] if key in layers else as_rows(params[key])
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensor of every merge key: the adapted layers' base weights and the fully trained parameters."""
        return {**base_weights(self.model), **self.trained_params()}

    def value(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The exact value of a written tensor: its fp32 master copy if one is kept, else the tensor itself."""
        return self.master.get(key, tensor.detach())

    def state(self) -> dict[str, torch.Tensor]:
        """theta_hat as checkpointed: every adapted layer's merged weight and every fully trained parameter."""
        out = {k: self.value(k, w) for k, w in base_weights(self.model).items()}
        out.update({k: p.detach() for k, p in self.trained_params().items()})
        return out

    def gathered(self, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """fp32 whole copies of the merged adapted weights and of the fully trained parameters (an export's input;
        gathered to host memory where the rows are split: every rank calls this, `keep` on the rank that writes)."""
        merged = {k: self.value(k, w).float() for k, w in base_weights(self.model).items()}
        trained = {k: p.detach().float() for k, p in self.trained_params().items()}
        return self.placement.gather(merged, keep), self.placement.gather(trained, keep)

    def snapshot(self, exclude: Callable[[str], bool] = lambda key: False) -> dict[str, torch.Tensor]:
        """fp32 copies of the adapted layers' weights and the fully trained parameters (keys `exclude` rejects are
        left out): the pretrained theta_0 when taken right after loading."""
        out = {k: self.value(k, w).float().clone() for k, w in base_weights(self.model).items() if not exclude(k)}
        out.update({k: p.detach().float().clone() for k, p in self.trained_params().items() if not exclude(k)})
        return out

    def restore(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Write `weights` (merge key -> value) into the model exactly; master copies follow."""
        targets = self.targets(weights)
        for key, value in weights.items():
            if targets[key].shape != value.shape:
                raise ValueError(f"{key!r}: value of shape {tuple(value.shape)}, weight {tuple(targets[key].shape)}")
        with torch.no_grad():
            for key, value in weights.items():
                value = self.placement.shard_like(value, targets[key])  # a whole value into split rows: this rank's
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
        placement = self.placement  # read once: found from the parameters when none was attached
        targets = self.targets(deltas, placement)
        for key, delta in deltas.items():
            a = alpha.get(key)
            finite = a is not None and (placement.all_finite(a) if isinstance(a, torch.Tensor) else math.isfinite(a))
            if not finite:
                raise NonFiniteError(f"no finite alpha for merge key {key!r}; nothing was written.")
            if targets[key].shape != delta.shape:
                raise ValueError(
                    f"delta for {key!r} has shape {tuple(delta.shape)}, weight {tuple(targets[key].shape)}"
                )
        new_value = lambda key: self._merged(targets[key], key, deltas[key], alpha[key], base)  # noqa: E731
        with torch.no_grad():
            for key in deltas:  # every new value is checked before any is written (computed once when bounded)
                if not self._surely_finite(targets[key], key, deltas[key], alpha[key], base, placement):
                    check_finite({key: new_value(key)}, "merged weights")
            scratch = Scratch(1, torch.float32).reserve(deltas.values())
            for key in deltas:
                if not self._add_into(targets[key], key, deltas[key], alpha[key], base, scratch):
                    weight, new = targets[key], new_value(key)
                    if weight.dtype != torch.float32:
                        self.master[key] = new.to(self.device or weight.device)
                    weight.copy_(new.to(weight.device, weight.dtype))

    def _start(self, weight, key: str, base) -> torch.Tensor:
        return base[key] if base is not None and key in base else self.value(key, weight)

    def _merged(self, weight, key: str, delta: torch.Tensor, a, base) -> torch.Tensor:
        start = self._start(weight, key, base).float()
        a = a.to(delta.device) if isinstance(a, torch.Tensor) else a
        return start.to(delta.device) + a * delta.float()

    def _add_into(self, weight, key: str, delta: torch.Tensor, a, base, scratch: Scratch) -> bool:
        """weight <- start + a * delta written straight into an fp32 weight (the bits of `_merged`, no new tensor);
        False, writing nothing, where the weight keeps a master copy, is split or lives elsewhere than the delta."""
        start = self._start(weight, key, base)
        tensors = (weight, start, delta) + ((a,) if isinstance(a, torch.Tensor) else ())
        if any(t.dtype != torch.float32 or t.device != weight.device for t in tensors):
            return False
        product = scratch.take(delta, *tensors)
        if product is None:
            return False
        torch.add(start, torch.mul(delta, a, out=product[0]), out=weight)
        return True

    def _surely_finite(self, weight, key: str, delta: torch.Tensor, a, base, placement: Replicated) -> bool:
        """start + a * delta is finite without forming it: max |start| + |a| max |delta| (two reductions, no copy)
        is below fp32's largest value. False for NaN or inf anywhere, a per-parameter alpha or split tensors: then the
        merged value itself is checked."""
        start = self._start(weight, key, base)
        if isinstance(a, torch.Tensor) or placement.splits({"start": start, "delta": delta}):
            return False
        if start.numel() == 0:
            return True
        bound = _max_abs(start) + abs(a) * _max_abs(delta)
        return math.isfinite(bound) and bound < torch.finfo(torch.float32).max

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
        with modules_fixed(self.model):
            lora = lora_task_vector(self.model, self.device)
            full, trained = {}, {}
            for key, param in self.trained_params().items():
                delta = param.detach().float() - before[key]
                if is_head(key):
                    delta = head_delta(key, delta)
                else:
                    trained[key] = param.detach().float().clone()
                if delta is not None:
                    full[key] = delta
            return TaskVector(lora, full, trained, adapter_factors(self.model))


def _max_abs(x: torch.Tensor) -> float:
    """max |x| from one min/max reduction (NaN when x holds a NaN)."""
    low, high = torch.aminmax(x.detach())
    return max(-float(low), float(high)) if not (low.isnan() or high.isnan()) else math.nan


class LowRankWeights(ModelWeights):
    """theta_hat for a base whose weights cannot be written (quantized, `merge_into: adapter`): the base stays as
    loaded and every merged LoRA delta alpha s B A is appended to a frozen merged adapter next to the trained one —
    exact (its rank is the sum of the task ranks) or compressed back to `max_rank` after each merge (the best
    approximation, its relative error kept in `errors`). Fully trained parameters are written as usual."""

    SEP = "::"  # state keys: "<merge key>::A" / "<merge key>::B"

    def __init__(self, model: nn.Module, device: str | None = None, max_rank: int | None = None):
        super().__init__(model, device)
        self.max_rank, self.errors = max_rank, []
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = merged_delta_hooks(model, self.factors)

    def append(self, adapter: Mapping[str, LoraFactors], alpha: Mapping[str, float]) -> None:
        """theta_hat_t = theta_hat_{t-1} + alpha s B A for every LoRA key: the factors joined to the merged adapter."""
        error = 0.0
        for key, f in adapter.items():
            A, B = f.A.float(), float(alpha[key]) * f.scaling * f.B.float()
            if key in self.factors:
                A = torch.cat([self.factors[key][0].cpu(), A], 0)
                B = torch.cat([self.factors[key][1].cpu(), B], 1)
            if self.max_rank is not None and A.shape[0] > self.max_rank:
                A, B, e = compress_factors(A, B, self.max_rank)
                error = max(error, e)
            check_finite({"A": A, "B": B}, f"the merged adapter of {key}")
            device = base_weights(self.model)[key].device
            self.factors[key] = (A.to(device), B.to(device))
        self.errors.append(error)

    def apply(self, deltas, alpha, base=None) -> None:
        lora = [k for k in deltas if k in base_weights(self.model)]
        if lora:
            raise ValueError(f"{lora[:2]}: a quantized base is never written; LoRA deltas are appended (`append`).")
        super().apply(deltas, alpha, base)

    def state(self) -> dict[str, torch.Tensor]:
        out = {k: p.detach() for k, p in self.trained_params().items()}
        for key, (A, B) in self.factors.items():
            out[f"{key}{self.SEP}A"], out[f"{key}{self.SEP}B"] = A, B
        return out

    def load_state(self, weights: Mapping[str, torch.Tensor]) -> None:
        pairs = {k for k in weights if self.SEP in k}
        super().restore({k: v for k, v in weights.items() if k not in pairs})
        layers = lora_layers(self.model)
        for name in pairs:
            key, part = name.rsplit(self.SEP, 1)
            if key not in layers:
                raise ValueError(f"the checkpoint's merged adapter has a layer {key!r} the model does not")
        for key in {n.rsplit(self.SEP, 1)[0] for n in pairs}:
            device = base_weights(self.model)[key].device
            self.factors[key] = tuple(weights[f"{key}{self.SEP}{p}"].float().to(device) for p in "AB")
