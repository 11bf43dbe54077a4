"""PEFT's OSF tuner (Orthogonal Subspace Fine-tuning, `peft.OSFConfig`) inside the LoRA-adapted layers: the other
module, with `adapters`, that knows PEFT layer internals.

For one task, each LoRA-adapted layer's frozen base `nn.Linear` is wrapped in PEFT's own `peft.tuners.osf.layer.Linear`
(its SVD split, the projection of the gradients of U_low and V_low away from the preserved top singular directions, its
forward) with the preserved rank `OSFConfig.effective_rank` resolves to, as `OSFModel` resolves it; the LoRA adapter
is frozen meanwhile. `unwrap_osf` takes the trained OSF delta of every layer off and puts the bare `nn.Linear` back:
the delta is what the merge writes into the base weight (PEFT's `merge_and_unload`, done by `ModelWeights`).
"""

from __future__ import annotations

import torch
from peft import OSFConfig
from peft.tuners.osf.layer import Linear as OSFLinear
from torch import nn

from .adapters import lora_layers, set_lora_trainable, unwrap

ADAPTER = "default"


def preserved_rank(effective_rank: int | float, min_dim: int) -> int:
    """The preserved (frozen) SVD rank of a `min_dim`-wide weight as `OSFModel` resolves `effective_rank` (a float in
    (0, 1] is a fraction of `min_dim`), kept >= 1 (PEFT refuses 0) and < `min_dim` (something stays trainable)."""
    rank = (
        int(min_dim * effective_rank)
        if isinstance(effective_rank, float) and 0 < effective_rank <= 1
        else int(effective_rank)
    )
    return max(1, min(rank, min_dim - 1))


def wrap_osf(model: nn.Module, effective_rank: int | float) -> dict[str, int]:
    """Wrap the base layer of every LoRA-adapted layer in PEFT's OSF layer (SVD of the current weight, top
    `preserved_rank` directions frozen) and freeze the LoRA factors; returns the preserved rank per merge key."""
    config = OSFConfig(target_modules=sorted({k.rsplit(".", 2)[-2] for k in lora_layers(model)}))
    config.effective_rank = effective_rank
    ranks = {}
    for key, layer in lora_layers(model).items():
        base = layer.base_layer
        if isinstance(base, OSFLinear) or not isinstance(base, nn.Linear):
            raise ValueError(f"{key}: OSF wraps a bare nn.Linear base layer, found {type(base).__name__}")
        ranks[key] = preserved_rank(effective_rank, min(base.weight.shape))
        layer.base_layer = OSFLinear(base, ADAPTER, config=config, effective_rank=ranks[key])
    set_lora_trainable(model, False)
    return ranks


def osf_layers(model: nn.Module) -> dict[str, OSFLinear]:
    """The OSF layers `wrap_osf` put in, by the merge key of the weight they adapt."""
    return {
        k: layer.base_layer
        for k, layer in lora_layers(unwrap(model)).items()
        if isinstance(layer.base_layer, OSFLinear)
    }


def osf_delta(layer: OSFLinear) -> torch.Tensor:
    """The trained update U_low S_low V_low - (the same at its start), fp32, in the base weight's layout."""
    with torch.no_grad():
        return layer.get_delta_weight(ADAPTER).detach().float().clone()


def unwrap_osf(model: nn.Module) -> dict[str, torch.Tensor]:
    """Take every OSF layer out (its gradient hooks removed, the bare `nn.Linear` back, the LoRA factors trainable
    again); returns each layer's trained delta by merge key (nothing is written to the base weights)."""
    deltas = {}
    for key, layer in lora_layers(unwrap(model)).items():
        osf = layer.base_layer
        if not isinstance(osf, OSFLinear):
            continue
        deltas[key] = osf_delta(osf)
        osf._detach_hooks()
        layer.base_layer = osf.base_layer
    set_lora_trainable(model, True)
    return deltas
