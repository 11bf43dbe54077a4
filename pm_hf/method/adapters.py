"""The only module that knows PEFT layer internals: attaching LoRA, the temporary adapter rescale, task vectors in
effective-weight space (Delta W = s * B @ A, in the base weight's layout), the base weights a merge writes (through
`pm_hf.method.weights.ModelWeights`), starting a fresh adapter and reading or writing adapter factors.

Keys of every tensor dict ("merge keys") are parameter names relative to the wrapped base model, e.g.
`bert.encoder.layer.0.attention.self.query.weight` for a LoRA-adapted layer (its effective weight) and
`bert.pooler.dense.bias` for a fully trained module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights
from torch import nn

from ..config.checks import invalid
from ..config.groups import LoraArguments
from ..distributed.placement import Replicated, placement_of
from .merge import LoraFactors

# PeftModel.__init__ (get_peft_model, PeftModel.from_pretrained) reads transformers' deprecated alias
# `is_gradient_checkpointing`: a FutureWarning about PEFT's code, printed at every adapter attached or loaded.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

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
    raise invalid(
        "target_modules",
        None,
        "could not be detected for this model (no q_proj/v_proj, query/value or c_attn modules): name its "
        "attention projections.",
    )


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def has_lora(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model or holds LoRA layers (a PEFT model's inner model)."""
    return isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules())


def attach_lora(model: nn.Module, lora_args: LoraArguments, trainable_modules: list[str] | None = None) -> PeftModel:
    """Wrap `model` in a PEFT LoRA model (adapter 'default', B = 0) and make `trainable_modules` fully trainable.

    Fully trained modules are handled here rather than by PEFT's `modules_to_save` so that merged values live in
    the base model itself (one copy, no per-task wrapper).
    """
    if has_lora(model):
        fix = "already holds LoRA layers (a PEFT model, or one's inner model): give the base model, unwrapped."
        raise invalid("model", type(model).__name__, fix)
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
    absent = [p for p in targets if not any(_matches(n, [p]) for n in names)]
    if absent:
        raise invalid("target_modules", targets, f"{absent} match no module of the model (suffix match).")
    missing = [p for p in patterns if not any(_matches(n, [p]) for n in names)]
    if missing:  # checked before the model is wrapped, so a bad name changes nothing
        fix = f"{missing} match no module of the model; check the names (suffix match, e.g. 'pooler')."
        raise invalid("modules_to_save", lora_args.modules_to_save, fix)
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


_WALKS: dict[int, dict[str, object]] = {}  # id(unwrapped model) -> what its walks found, while `modules_fixed` holds


@contextmanager
def modules_fixed(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's LoRA layers and parameters are found by one walk over its modules each (at first
    use), not one per call: for the steps of a merge, where no module is added, removed, frozen or unfrozen."""
    key = id(unwrap(model))
    if key in _WALKS:  # nested: the outer block's walks serve
        yield
        return
    _WALKS[key] = {}
    try:
        yield
    finally:
        del _WALKS[key]


def _walked(model: nn.Module, what: str, walk):
    found = _WALKS.get(id(unwrap(model)))
    if found is None:
        return walk()
    if what not in found:
        found[what] = walk()
    return found[what]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """LoRA layers keyed by the merge key of their effective weight (`<module>.weight`)."""

    def walk():
        return [(strip_prefix(n) + ".weight", m) for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)]

    return dict(_walked(model, "lora", walk))


def named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of the model by its name relative to the base model (as merge keys)."""
    return dict(_walked(model, "params", lambda: [(strip_prefix(n), p) for n, p in unwrap(model).named_parameters()]))


def uses_fan_in_fan_out(model: nn.Module) -> bool:
    """Whether the adapted layers store their weight transposed (GPT-2's Conv1D)."""
    return any(layer.fan_in_fan_out for layer in lora_layers(model).values())


def active_adapter(model: nn.Module) -> str:
    return active_layers(model)[0]


def active_layers(model: nn.Module) -> tuple[str, dict[str, LoraLayer]]:
    """The active adapter's name and the LoRA layers by merge key, from one walk over the modules."""
    layers = lora_layers(model)
    if not layers:
        fix = "has no LoRA layers: wrap it with `pm_hf.method.adapters.attach_lora` (or PEFT's get_peft_model) first."
        raise invalid("model", type(model).__name__, fix)
    names = next(iter(layers.values())).active_adapters
    if len(names) != 1:
        raise invalid("model", names, "P&M trains one adapter at a time: call `set_adapter` with one of them.")
    return names[0], layers


def full_trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not adapter factors (LoRA's, or OSF's of `adapters_osf`): fully trained modules,
    heads, by merge key, as the run's placement reads and writes them (a ZeRO-3 parameter as the rows its partition
    holds)."""
    as_rows = placement_of(model).as_rows
    return {strip_prefix(n): as_rows(p) for n, p in _fully_trained(model)}


def _fully_trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    def walk():
        params = unwrap(model).named_parameters()
        skip = (".lora_", "lora_magnitude", ".osf_svd_params.")
        return [(n, p) for n, p in params if p.requires_grad and not any(part in n for part in skip)]

    return _walked(model, "trained", walk)


@contextmanager
def scale_active_adapter(model: nn.Module, factor: float) -> Iterator[None]:
    """Multiply the active adapter's scaling by `factor` in every LoRA layer; restore the exact old values after.

    Delta W = s * B @ A is linear in s, so this evaluates the model at theta_hat + factor * Delta and autograd
    includes the factor in the gradients of A and B.
    """
    if factor == 1.0:
        yield
        return
    name, by_key = active_layers(model)
    layers = list(by_key.values())
    saved = [layer.scaling[name] for layer in layers]
    try:
        for layer, s in zip(layers, saved):
            layer.scaling[name] = s * factor
        yield
    finally:
        for layer, s in zip(layers, saved):
            layer.scaling[name] = s


def _factors(layer: LoraLayer, name: str, placement: Replicated) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A, B whole (gathered where they are split) and the scaling s of adapter `name`."""
    A, B = placement.factors(layer.lora_A[name].weight, layer.lora_B[name].weight)
    return A, B, float(layer.scaling[name])


def lora_delta(layer: LoraLayer, name: str, placement: Replicated | None = None) -> torch.Tensor:
    """Delta W = s * B @ A in fp32, in the layout of the base weight (transposed for GPT-2 Conv1D), split by rows as
    the base weight is (B's rows are the weight's rows)."""
    placement = placement or placement_of(layer)
    weight = layer.get_base_layer().weight
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    return placement.lora_delta(A, B, float(layer.scaling[name]), weight, bool(layer.fan_in_fan_out))


def lora_task_vector(model: nn.Module, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Delta W of the active adapter for every LoRA layer, by merge key (moved to `device` layer by layer, so the
    accelerator holds one layer's at a time)."""
    (name, layers), placement = active_layers(model), placement_of(model)
    return {key: lora_delta(layer, name, placement).to(device or layer.weight.device) for key, layer in layers.items()}


def task_vector_norm(model: nn.Module) -> float:
    """||Delta||_F over all LoRA layers, via r x r Gram matrices (never forms B @ A)."""
    (name, layers), placement = active_layers(model), placement_of(model)
    total = 0.0
    with torch.no_grad():
        for layer in layers.values():
            A, B, s = _factors(layer, name, placement)
            A, B = A.float(), B.float()
            total += s * s * float(((B.T @ B) * (A @ A.T)).sum())  # A, B whole (`_factors`): r x r products
    return math.sqrt(max(total, 0.0))


@contextmanager
def gaussian_adapter_noise(model: nn.Module, eps: float, sign: int, seed: int) -> Iterator[None]:
    """Add isotropic noise N to each LoRA layer's output delta, with ||N||_F = eps * ||Delta W||_F in expectation.

    The noise matrix is drawn from `seed` (so micro-batches of one optimizer step share it) and does not depend on
    the parameters: this is the paper's isotropic-noise ablation, not a task-vector perturbation.
    """
    (name, layers), placement = active_layers(model), placement_of(model)
    handles = []
    gen = torch.Generator().manual_seed(seed)
    try:
        for layer in layers.values():
            A, B, s = _factors(layer, name, placement)
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


def reset_adapter(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Start a fresh adapter for the next task, as PEFT initialises one: A Kaiming-uniform (drawn on the CPU from
    `generator`, else the global RNG), B = 0."""
    (name, layers), place = active_layers(model), placement_of(model)
    for layer in layers.values():
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        fresh = torch.empty(place.shape(A), dtype=torch.float32)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        place.write(A, fresh)
        place.write(B, torch.zeros(place.shape(B)))
        if getattr(layer.lora_B[name], "bias", None) is not None:
            place.write(layer.lora_B[name].bias, torch.zeros(place.shape(layer.lora_B[name].bias)))


def lora_weights(model: nn.Module, part: str = "A") -> dict[str, nn.Parameter]:
    """The active adapter's A (or B) of every LoRA layer (the live parameters, for a loss on them), by merge key."""
    name, layers = active_layers(model)
    return {key: getattr(layer, f"lora_{part}")[name].weight for key, layer in layers.items()}


def set_lora_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (or unfreeze) the active adapter's A and B in every LoRA layer (a task trained by other factors)."""
    name, layers = active_layers(model)
    for layer in layers.values():
        layer.lora_A[name].requires_grad_(trainable)
        layer.lora_B[name].requires_grad_(trainable)


def adapter_factors(model: nn.Module) -> dict[str, LoraFactors]:
    """The active adapter's factors (fp32 CPU copies) and scaling, by merge key."""
    (name, layers), placement = active_layers(model), placement_of(model)
    out = {}
    for key, layer in layers.items():
        A, B, s = _factors(layer, name, placement)
        out[key] = LoraFactors(
            A.detach().float().cpu().clone(), B.detach().float().cpu().clone(), s, bool(layer.fan_in_fan_out)
        )
    return out


def load_adapter_factors(model: nn.Module, factors: Mapping[str, LoraFactors], adapter: str | None = None) -> None:
    """Write A and B of `factors` into an adapter (default: the active one); every layer must be given."""
    name, place = adapter or active_adapter(model), placement_of(model)
    layers = lora_layers(model)
    if set(layers) != set(factors):
        missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
        raise ValueError(
            f"adapter factors do not match the model's LoRA layers: missing {missing[:3]}, extra {extra[:3]}"
        )
    for key, layer in layers.items():
        for module, value in ((layer.lora_A[name], factors[key].A), (layer.lora_B[name], factors[key].B)):
            if place.shape(module.weight) != tuple(value.shape):
                raise ValueError(f"{key}: factor of shape {tuple(value.shape)}, adapter {place.shape(module.weight)}")
            place.write(module.weight, value)


def load_adapter_weights(model: nn.Module, source: str, lora_only: bool = False) -> None:
    """Load a saved PEFT adapter (a folder or Hub id: its LoRA factors and `modules_to_save`, or with `lora_only` its
    LoRA factors alone) into the active adapter of `model`, which must have the same LoRA layers and ranks."""
    weights = load_peft_weights(source)
    if lora_only:
        weights = {k: v for k, v in weights.items() if ".lora_" in k}
    name = active_adapter(model)
    try:
        result = set_peft_model_state_dict(unwrap(model), weights, adapter_name=name)
    except RuntimeError as err:  # shapes that differ
        raise ValueError(f"{source}: {' '.join(str(err).split())[:300]}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"{source}: keys that do not fit the model: {(result.unexpected_keys + missing)[:3]}")


def is_quantized(model: nn.Module) -> bool:
    """Whether the model has weights that cannot hold a merged delta (LoRA-wrapped or not): not floating point (an
    integer stand-in), or bitsandbytes' packed 4/8-bit weights."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and (
            not weight.dtype.is_floating_point or hasattr(weight, "quant_state") or hasattr(weight, "SCB")
        ):
            return True
    return False


def merged_delta_hooks(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
    """Add x A^T B^T to each adapted layer's output, with (A [R, d_in], B [d_out, R]) = `factors[key]` read at every
    call: a frozen merged adapter next to the trained one, for bases whose weights cannot be written."""
    handles = []
    for key, layer in lora_layers(model).items():

        def hook(module, args, out, key=key):
            pair = factors.get(key)
            if pair is None:
                return out
            A, B = pair
            return out + ((args[0].to(A.dtype) @ A.T) @ B.T).to(out.dtype)

        handles.append(layer.register_forward_hook(hook))
    return handles


def zero_adapter(model: nn.Module) -> None:
    """B = 0 in the active adapter: its contribution vanishes (after its delta has been merged into the base)."""
    (name, layers), place = active_layers(model), placement_of(model)
    for layer in layers.values():
        B = layer.lora_B[name].weight
        place.write(B, torch.zeros(place.shape(B)))


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model without the adapter's contribution (base weights only)."""
    peft_model = unwrap(model)
    if not isinstance(peft_model, PeftModel):
        raise ValueError("`adapter_disabled` needs the PeftModel returned by `attach_lora`.")
    with peft_model.disable_adapter():
        yield


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weight of every LoRA-adapted layer (the tensor a merge writes), by merge key."""
    as_rows = placement_of(model).as_rows  # ZeRO-3: the rows its partition holds
    return {key: as_rows(layer.get_base_layer().weight) for key, layer in lora_layers(model).items()}


def merge_key_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every LoRA-adapted layer's base weight and of every fully trained parameter, by merge key (a
    ZeRO-3 weight's own, not its empty local data)."""
    shape = placement_of(model).shape
    out = {key: shape(layer.get_base_layer().weight) for key, layer in lora_layers(model).items()}
    return {**out, **{strip_prefix(n): shape(p) for n, p in _fully_trained(model)}}


def set_lora_factors(model: nn.Module, A: Mapping[str, torch.Tensor], B: Mapping[str, torch.Tensor], name: str) -> None:
    """Copy full A and B matrices into adapter `name` of every LoRA layer (export of a merged adapter)."""
    place = placement_of(model)
    for key, layer in lora_layers(model).items():
        for module, value in ((layer.lora_A[name], A[key]), (layer.lora_B[name], B[key])):
            place.write(module.weight, value)
