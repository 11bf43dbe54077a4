"""What `pm-hf merge` checks before anything is loaded or written: the adapters' configs (one base model, compared
after resolving local paths, Hub ids as ids; one task type, the same LoRA layers, rank and scaling), the modules they
train in full (PEFT's `modules_to_save`, e.g. the head of every SEQ_CLS adapter: the same tensors of the same shapes
in every adapter) and how those fit the model they are merged on. A mismatch is `<field> = <value>: <fix>`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from safetensors import SafetensorError
from torch import nn

from ..config.checks import invalid
from ..heads.head import find_head
from ..method.adapters import strip_prefix, unwrap
from .origin import base_reference, resolve_base
from .repository import HUB_ERRORS

SAME = ("task_type", "target_modules", "r", "lora_alpha", "use_rslora", "fan_in_fan_out")
ALIKE = "merge adapters trained alike from one base model."


def adapter_configs(adapters: Sequence[str]) -> list[LoraConfig]:
    """The adapters' LoRA configs, which must share the base model (and revision) and the settings in `SAME`."""
    if not adapters:
        raise invalid("adapters", [], "give the adapters to merge, in order (folders or Hub ids).")
    configs = [_config(source) for source in adapters]
    first = adapters[0]
    for source, config in zip(adapters[1:], configs[1:]):
        _check_base(first, configs[0], source, config)
        for name in SAME:
            mine, theirs = _setting(config, name), _setting(configs[0], name)
            if mine != theirs:
                raise invalid(
                    name, mine, f"the adapter {source}'s; the first adapter ({first}) has {theirs!r}: {ALIKE}"
                )
    return configs


def _config(source: str) -> LoraConfig:
    try:
        config = PeftConfig.from_pretrained(source)
    except (*HUB_ERRORS, TypeError) as err:
        raise invalid("adapters", source, f"not a PEFT adapter folder or Hub id ({type(err).__name__}).") from None
    if getattr(config, "peft_type", None) != "LORA":
        raise invalid("adapters", source, "is not a LoRA adapter.")
    return config


def _setting(config: LoraConfig, name: str):
    value = getattr(config, name, None)
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def adapter_base(source: str, config: LoraConfig) -> tuple[str, str | None]:
    """The adapter's base model as one name: a local folder by its resolved absolute path (a relative path taken from
    the adapter's folder when it names a folder there, else from here), a Hub id as it is, with its revision."""
    return base_reference(resolve_base(source, config.base_model_name_or_path), config.revision)


def _check_base(first: str, first_config: LoraConfig, source: str, config: LoraConfig) -> None:
    (mine, mine_rev), (theirs, theirs_rev) = adapter_base(source, config), adapter_base(first, first_config)
    if mine != theirs:
        fix = f"the adapter {source} was trained from {mine!r}, the first adapter ({first}) from {theirs!r}"
        raise invalid("base_model_name_or_path", config.base_model_name_or_path, f"{fix}: {ALIKE}")
    if mine_rev != theirs_rev:
        fix = f"the adapter {source}'s; the first adapter ({first}) was trained from revision {theirs_rev!r}"
        raise invalid("revision", mine_rev, f"{fix}: {ALIKE}")


def same_model(a: str, b: str) -> bool:
    """Whether two `model_name_or_path` values name one model: local folders after resolving, Hub ids as ids."""
    return base_reference(a)[0] == base_reference(b)[0]


def _saved(source: str) -> dict[str, torch.Tensor]:
    names = ("adapter_model.safetensors", "adapter_model.bin")
    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in names):
        raise invalid("adapters", source, "holds no adapter_model.safetensors: give a folder PEFT saved an adapter to.")
    try:
        weights = load_peft_weights(source)
    except (*HUB_ERRORS, TypeError, SafetensorError) as err:  # a damaged file: SafetensorError
        raise invalid("adapters", source, f"its adapter weights cannot be read ({type(err).__name__}).") from None
    return {strip_prefix(k): v for k, v in weights.items()}


def saved_modules(source: str) -> dict[str, torch.Tensor]:
    """The tensors an adapter trains in full (its `modules_to_save`), by merge key (e.g. `classifier.weight`)."""
    return {k: v.float() for k, v in _saved(source).items() if ".lora_" not in k}


def lora_weight_shapes(source: str, fan_in_fan_out: bool = False) -> dict[str, torch.Size]:
    """The shape of the base weight each LoRA layer of an adapter adapts (B @ A, transposed for fan_in_fan_out), by
    merge key: what the model it is merged on must hold."""
    saved, out = _saved(source), {}
    for key, A in saved.items():
        if key.endswith(".lora_A.weight") and A.dim() == 2:
            B = saved[key.replace(".lora_A.", ".lora_B.")]
            shape = [B.shape[0], A.shape[1]]
            out[key.replace(".lora_A.weight", ".weight")] = torch.Size(shape[::-1] if fan_in_fan_out else shape)
    return out


def adapter_modules(adapters: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """Each adapter's `saved_modules`: the same keys and shapes in every adapter."""
    modules = [saved_modules(source) for source in adapters]
    first = _shapes(modules[0])
    for source, saved in zip(adapters[1:], modules[1:]):
        shapes = _shapes(saved)
        if set(shapes) != set(first):
            fix = f"the tensors the adapter {source} trains in full; the first adapter's are {sorted(first)}"
            raise invalid("modules_to_save", sorted(shapes), f"{fix}: {ALIKE}")
        for key in _weights_first(shapes):
            if shapes[key] != first[key]:
                fix = f"the shape of the adapter {source}'s {key}; the first adapter's is {first[key]}"
                raise invalid(key, shapes[key], f"{fix}: merge adapters with one head size (num_labels) from one base.")
    return modules


def _weights_first(keys) -> list[str]:
    """`keys` sorted, a module's weight before its bias (the weight's shape tells the head size)."""
    return sorted(keys, key=lambda key: (not key.endswith(".weight"), key))


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in tensors.items()}


def average_modules(modules: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`HEAD_RULE`: each fully trained tensor of the merge is the plain average of the adapters' copies."""
    return {key: sum(m[key] for m in modules) / len(modules) for key in modules[0]}


def model_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The shape of every parameter of `model` by merge key (PEFT's `modules_to_save` wrappers seen through)."""
    shapes = {}
    for name, param in unwrap(model).named_parameters():
        parts = strip_prefix(name).split(".")
        if "original_module" in parts or any(p.startswith("lora_") for p in parts):
            continue
        parts = [p for p in parts if p != "base_layer"]
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            parts = parts[:i] + parts[i + 2 :]
        shapes[".".join(parts)] = list(param.shape)
    return shapes


def check_fit(tensors: Mapping[str, torch.Tensor | torch.Size], shapes: Mapping[str, list[int]], where: str,
              fix: str, field: str = "modules_to_save") -> None:  # fmt: skip
    """Every tensor (or shape) of the adapters by merge key has a parameter of its shape in the model (`shapes`);
    a key the model lacks is reported as `field`."""
    for key in _weights_first(tensors):
        shape = list(getattr(tensors[key], "shape", tensors[key]))
        if key not in shapes:
            raise invalid(field, key, f"{where} has no parameter {key}: {fix}")
        if shape != shapes[key]:
            raise invalid(key, shape, f"the adapters' shape; {where}'s is {shapes[key]}: {fix}")


def head_labels(model: nn.Module, num_labels: int, modules: Mapping[str, torch.Tensor]) -> int:
    """The number of classes of the adapters' head (their copy of the model's classification head), else
    `num_labels`: a PEFT classifier was trained on the base loaded with its own `num_labels`."""
    try:
        name, _ = find_head(model, num_labels)
    except ValueError:
        return num_labels
    weight = modules.get(f"{name}.weight")
    return num_labels if weight is None or weight.dim() != 2 else int(weight.shape[0])
