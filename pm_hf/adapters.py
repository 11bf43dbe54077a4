"""The only module that knows PEFT internals: attaching LoRA, the temporary adapter rescale, task vectors in
effective-weight space (Delta W = s * B @ A, in the base weight's layout), writing merged weights through an fp32
master copy, starting a fresh adapter, the per-task (alpha, A, B, s) history and export as one PEFT adapter.

Keys of every tensor dict ("merge keys") are parameter names relative to the wrapped base model, e.g.
`bert.encoder.layer.0.attention.self.query.weight` for a LoRA-adapted layer (its effective weight) and
`bert.pooler.dense.bias` for a fully trained module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import LoraArguments

_PREFIXES = ("base_model.model.", "module.")
# Known attention projection names per family, in detection order (transformers 5.x: ViT/Llama q_proj..., BERT query).
_TARGET_FAMILIES = (
    {"qv": ["q_proj", "v_proj"], "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {"qv": ["query", "value"], "qkvo": ["query", "key", "value", "attention.output.dense"]},
    {"qv": ["c_attn"], "qkvo": ["c_attn", "attn.c_proj"]},
)


def strip_prefix(name: str) -> str:
    """Module/parameter name relative to the base model (PEFT and DDP wrappers removed)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/accelerate wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def detect_target_modules(model: nn.Module, kind: str = "qv") -> list[str]:
    """Attention projections to adapt, detected from the module names ('qv' or 'qkvo')."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    full = [n for n, _ in model.named_modules()]
    for family in _TARGET_FAMILIES:
        targets = family[kind]
        if all(t in names or any(f.endswith(t) for f in full) for t in targets):
            return list(targets)
    raise ValueError(
        "`target_modules` could not be detected for this model (no q_proj/v_proj, query/value or c_attn modules); "
        "set `target_modules` in the LoRA arguments to the names of its attention projections."
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def attach_lora(model: nn.Module, lora_args: LoraArguments, trainable_modules: list[str] | None = None) -> PeftModel:
    """Wrap `model` in a PEFT LoRA model (adapter 'default', B = 0) and make `trainable_modules` fully trainable.

    Fully trained modules are handled here rather than by PEFT's `modules_to_save` so that merged values live in
    the base model itself (one copy, no per-task wrapper).
    """
    targets = lora_args.target_modules or detect_target_modules(model)
    config = LoraConfig(
        r=lora_args.r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        use_rslora=lora_args.use_rslora,
        fan_in_fan_out=_uses_conv1d(model, targets),
    )
    patterns = list(lora_args.modules_to_save or []) + list(trainable_modules or [])
    names = [strip_prefix(n) for n, _ in model.named_modules()]
    missing = [p for p in patterns if not any(_matches(n, [p]) for n in names)]
    if missing:  # checked before the model is wrapped, so a bad name changes nothing
        raise ValueError(
            f"`modules_to_save` / trainable modules {missing} match no module of the model; "
            "check the module names (suffix match, e.g. 'pooler' or 'classifier')."
        )
    peft_model = get_peft_model(model, config)
    for name, module in peft_model.named_modules():
        if patterns and _matches(strip_prefix(name), patterns) and not isinstance(module, LoraLayer):
            for p in module.parameters():
                p.requires_grad_(True)
    return peft_model


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    for name, module in model.named_modules():
        if _matches(name, targets) and type(module).__name__ == "Conv1D":
            return True
    return False


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """LoRA layers keyed by the merge key of their effective weight (`<module>.weight`)."""
    return {strip_prefix(n) + ".weight": m for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)}


def active_adapter(model: nn.Module) -> str:
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA layers; wrap it with `pm_hf.adapters.attach_lora` first.")
    names = layers[0].active_adapters
    if len(names) != 1:
        raise ValueError(f"P&M trains one adapter at a time, but {names} are active; call `set_adapter` with one.")
    return names[0]


def full_trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not LoRA factors (fully trained modules, heads), by merge key."""
    return {
        strip_prefix(n): p
        for n, p in unwrap(model).named_parameters()
        if p.requires_grad and ".lora_" not in n and "lora_magnitude" not in n
    }


@contextmanager
def scale_active_adapter(model: nn.Module, factor: float) -> Iterator[None]:
    """Multiply the active adapter's scaling by `factor` in every LoRA layer; restore the exact old values after.

    Delta W = s * B @ A is linear in s, so this evaluates the model at theta_hat + factor * Delta and autograd
    includes the factor in the gradients of A and B.
    """
    if factor == 1.0:
        yield
        return
    name = active_adapter(model)
    layers = list(lora_layers(model).values())
    saved = [layer.scaling[name] for layer in layers]
    try:
        for layer, s in zip(layers, saved):
            layer.scaling[name] = s * factor
        yield
    finally:
        for layer, s in zip(layers, saved):
            layer.scaling[name] = s


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    return layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name])


def lora_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """Delta W = s * B @ A in fp32, in the layout of the base weight (transposed for GPT-2 Conv1D)."""
    A, B, s = _factors(layer, name)
    delta = (B.detach().float() @ A.detach().float()) * s
    return delta.T if layer.fan_in_fan_out else delta


def lora_task_vector(model: nn.Module) -> dict[str, torch.Tensor]:
    """Delta W of the active adapter for every LoRA layer, by merge key."""
    name = active_adapter(model)
    return {key: lora_delta(layer, name) for key, layer in lora_layers(model).items()}


def task_vector_norm(model: nn.Module) -> float:
    """||Delta||_F over all LoRA layers, via r x r Gram matrices (never forms B @ A)."""
    name = active_adapter(model)
    total = 0.0
    with torch.no_grad():
        for layer in lora_layers(model).values():
            A, B, s = _factors(layer, name)
            A, B = A.float(), B.float()
            total += s * s * float(((B.T @ B) * (A @ A.T)).sum())
    return math.sqrt(max(total, 0.0))


@contextmanager
def gaussian_adapter_noise(model: nn.Module, eps: float, sign: int, seed: int) -> Iterator[None]:
    """Add isotropic noise N to each LoRA layer's output delta, with ||N||_F = eps * ||Delta W||_F in expectation.

    The noise matrix is drawn from `seed` (so micro-batches of one optimizer step share it) and does not depend on
    the parameters: this is the paper's isotropic-noise ablation, not a task-vector perturbation.
    """
    name = active_adapter(model)
    handles = []
    gen = torch.Generator().manual_seed(seed)
    try:
        for layer in lora_layers(model).values():
            A, B, s = _factors(layer, name)
            with torch.no_grad():
                norm = s * math.sqrt(max(float(((B.float().T @ B.float()) * (A.float() @ A.float().T)).sum()), 0.0))
            if norm == 0.0:
                continue
            out_f, in_f = B.shape[0], A.shape[1]
            noise = torch.randn(out_f, in_f, generator=gen) * (sign * eps * norm / math.sqrt(out_f * in_f))
            noise = noise.to(B.device, B.dtype)
            handles.append(layer.register_forward_hook(lambda m, args, out, n=noise: out + args[0].to(n.dtype) @ n.T))
        yield
    finally:
        for h in handles:
            h.remove()


def reset_adapter(model: nn.Module) -> None:
    """Start a fresh adapter for the next task: A re-initialised (Kaiming, global RNG), B = 0."""
    name = active_adapter(model)
    for layer in lora_layers(model).values():
        layer.reset_lora_parameters(name, True)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The active adapter's factors (fp32 CPU copies), keyed '<merge key>/A' and '<merge key>/B'."""
    name = active_adapter(model)
    out = {}
    for key, layer in lora_layers(model).items():
        out[f"{key}/A"] = layer.lora_A[name].weight.detach().float().cpu().clone()
        out[f"{key}/B"] = layer.lora_B[name].weight.detach().float().cpu().clone()
    return out


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write factors saved by `adapter_state` back into the active adapter (exact for fp32 factors)."""
    name = active_adapter(model)
    with torch.no_grad():
        for key, layer in lora_layers(model).items():
            for part, module in (("A", layer.lora_A[name]), ("B", layer.lora_B[name])):
                module.weight.copy_(state[f"{key}/{part}"].to(module.weight.device, module.weight.dtype))


def zero_adapter(model: nn.Module) -> None:
    """B = 0 in the active adapter: its contribution vanishes (after its delta has been merged into the base)."""
    name = active_adapter(model)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[name].weight.zero_()


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model without the adapter's contribution (base weights only)."""
    peft_model = unwrap(model)
    if not isinstance(peft_model, PeftModel):
        raise ValueError("`adapter_disabled` needs the PeftModel returned by `attach_lora`.")
    with peft_model.disable_adapter():
        yield


@dataclass
class TaskRecord:
    """One task's adapter, enough to rebuild its merged contribution alpha * s * B @ A exactly."""

    alpha: dict[str, float]
    scaling: dict[str, float]
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    fan_in_fan_out: bool


def record_task(model: nn.Module, alpha: Mapping[str, float]) -> TaskRecord:
    """Snapshot the active adapter's factors (fp32, CPU) with the alpha applied to each layer."""
    name = active_adapter(model)
    layers = lora_layers(model)
    rec = TaskRecord({}, {}, {}, {}, False)
    for key, layer in layers.items():
        A, B, s = _factors(layer, name)
        rec.alpha[key], rec.scaling[key] = float(alpha[key]), s
        rec.A[key], rec.B[key] = A.detach().float().cpu().clone(), B.detach().float().cpu().clone()
        rec.fan_in_fan_out = bool(layer.fan_in_fan_out)
    return rec


def history_delta(history: list[TaskRecord]) -> dict[str, torch.Tensor]:
    """sum_i alpha_i * s_i * B_i @ A_i per LoRA key, in the base weight's layout (fp32)."""
    total: dict[str, torch.Tensor] = {}
    for rec in history:
        for key in rec.A:
            d = rec.alpha[key] * rec.scaling[key] * (rec.B[key] @ rec.A[key])
            d = d.T if rec.fan_in_fan_out else d
            total[key] = total[key] + d if key in total else d
    return total


class MergedWeights:
    """Writes theta_hat_t into the model: LoRA keys into the base layer weight, full keys into the parameter.

    When the model's weights are not fp32, an fp32 master copy of every merged tensor is kept (on `device`) and the
    model's weight is re-cast from it after every merge, so many merges do not accumulate rounding.
    """

    def __init__(self, device: str | None = None):
        self.device = device
        self.master: dict[str, torch.Tensor] = {}

    @staticmethod
    def targets(model: nn.Module, keys) -> dict[str, torch.Tensor]:
        """The tensor each merge key writes to (LoRA key: the base layer's weight)."""
        layers = lora_layers(model)
        params = {strip_prefix(n): p for n, p in unwrap(model).named_parameters()}
        out = {}
        for key in keys:
            if key in layers:
                out[key] = layers[key].get_base_layer().weight
            elif key in params:
                out[key] = params[key]
            else:
                raise ValueError(f"merge key {key!r} is neither a LoRA layer nor a parameter of the model.")
        return out

    def apply(
        self,
        model: nn.Module,
        base: Mapping[str, torch.Tensor] | None,
        deltas: Mapping[str, torch.Tensor],
        alpha: Mapping[str, float | torch.Tensor],
    ) -> None:
        """Set each key to base + alpha * delta (base=None: the current model value, or its master copy); alpha is a
        float or a per-parameter tensor per key."""
        targets = self.targets(model, deltas)  # validate every key before writing any
        for key, delta in deltas.items():
            a = alpha.get(key)
            finite = a is not None and (
                bool(torch.isfinite(a).all()) if isinstance(a, torch.Tensor) else math.isfinite(a)
            )
            if not finite:
                raise ValueError(f"no finite alpha for merge key {key!r}")
            if targets[key].shape != delta.shape:
                raise ValueError(
                    f"delta for {key!r} has shape {tuple(delta.shape)}, weight {tuple(targets[key].shape)}"
                )
        with torch.no_grad():
            for key, delta in deltas.items():
                weight = targets[key]
                if base is not None:
                    start = base[key].float()
                elif key in self.master:
                    start = self.master[key]
                else:
                    start = weight.detach().float()
                a = alpha[key].to(delta.device) if isinstance(alpha[key], torch.Tensor) else alpha[key]
                new = start.to(delta.device) + a * delta.float()
                if weight.dtype != torch.float32:
                    self.master[key] = new.to(self.device or weight.device)
                weight.copy_(new.to(weight.device, weight.dtype))


def dense_record(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> TaskRecord:
    """A `TaskRecord` whose factors reproduce dense deltas (base-weight layout) exactly: B = U diag(S), A = V^T from the
    SVD, zero-padded to one common rank (the largest min(out, in)); alpha = scaling = 1."""
    layers = lora_layers(model)
    fan = any(layer.fan_in_fan_out for layer in layers.values())
    rank = max(min(d.shape) for d in deltas.values())
    rec = TaskRecord({}, {}, {}, {}, fan)
    for key, delta in deltas.items():
        d = delta.double().T if fan else delta.double()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = S.shape[0]
        B = torch.zeros(d.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, d.shape[1], dtype=torch.float64)
        B[:, :k], A[:k] = U * S, Vh
        rec.A[key], rec.B[key] = A.float(), B.float()
        rec.alpha[key], rec.scaling[key] = 1.0, 1.0
    return rec


def export_merged_adapter(
    base_model: nn.Module,
    history: list[TaskRecord],
    full_params: Mapping[str, torch.Tensor],
    save_modules: list[str],
    out_dir: str,
) -> PeftModel:
    """Save sum_i alpha_i s_i B_i A_i as ONE PEFT LoRA adapter of rank sum_i r_i (exact: B = [alpha_i s_i B_i],
    A = [A_i], scaling 1), with the merged fully trained modules (head, pooler) as `modules_to_save`.

    Args:
        base_model: a pristine copy of the pretrained model (same architecture and head size).
        history: the per-task records.
        full_params: merged values of the fully trained parameters, by merge key.
        save_modules: module names for `modules_to_save` (they must own every key of `full_params`).
        out_dir: where `save_pretrained` writes; `PeftModel.from_pretrained(base, out_dir)` loads it.
    """
    if not history:
        raise ValueError("the history is empty: train at least one task before exporting.")
    keys = list(history[0].A)
    rank = sum(rec.A[keys[0]].shape[0] for rec in history)
    targets = sorted({k[: -len(".weight")] for k in keys})
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        modules_to_save=save_modules or None,
        fan_in_fan_out=history[0].fan_in_fan_out,
        init_lora_weights=False,
    )
    model = get_peft_model(base_model, config)
    layers = lora_layers(model)
    if set(layers) != set(keys):
        raise ValueError(f"the base model's LoRA layers {sorted(layers)[:3]}... differ from the history's keys.")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, layer in layers.items():
            layer.lora_A["default"].weight.copy_(torch.cat([rec.A[key] for rec in history], 0))
            layer.lora_B["default"].weight.copy_(
                torch.cat([rec.alpha[key] * rec.scaling[key] * rec.B[key] for rec in history], 1)
            )
        for key, value in full_params.items():
            matches = [n for n in params if _wrapped_name(n, key)]
            if len(matches) != 1:
                raise ValueError(f"fully trained parameter {key!r} is not covered by `modules_to_save`={save_modules}.")
            params[matches[0]].copy_(value)
    model.save_pretrained(out_dir)
    return model


def _wrapped_name(param_name: str, key: str) -> bool:
    """Whether `param_name` is the modules_to_save copy of merge key `key` (wrapper inserted at any depth)."""
    parts = strip_prefix(param_name).split(".")
    if "modules_to_save" not in parts:
        return False
    i = parts.index("modules_to_save")
    return ".".join(parts[:i] + parts[i + 2 :]) == key
