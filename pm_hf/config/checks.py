"""Checks of user input and of tensors before they are used or written. A failed check raises `ValueError` with the
message `<field> = <value>: <fix>` (the CLI prints it as `pm-hf: error: ...` and exits 2), or `NonFiniteError`
when a tensor that is about to be used or written holds NaN or inf."""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..distributed.sharding import all_finite, scalar
from ..errors import InputError, NonFiniteError, invalid  # noqa: F401 (re-exported)


def check_choice(name: str, value: Any, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise invalid(name, value, f"use one of {choices}.")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """A finite number (an int when `integer`) within [low, high] (open ends where asked)."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else is_number(value)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f" {'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{' and' if lo else ''} {'<' if high_open else '<='} {high}"
        raise invalid(name, value, f"use {kind}{lo}{hi}{' or null' if optional else ''}.")


def check_device(name: str, value: Any) -> None:
    """null, or a device string torch understands ('cpu', 'cuda', 'cuda:1', ...); whether this machine has it is
    `check_devices_here`'s (a saved run trained on a GPU is still evaluated and exported on a CPU)."""
    if value is None:
        return
    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise invalid(name, value, "use a device such as 'cpu' or 'cuda:0', or null for the model's device.") from None


def check_devices_here(**devices: Any) -> None:
    """The devices a run will use (`fisher_device`, `accumulator_device`) exist on this machine: refused before
    anything trains, not at the first Fisher or merge (CUDA devices are counted only when one is asked for)."""
    for name, value in devices.items():
        device = torch.device(value) if value is not None else None
        if device is None or device.type != "cuda":
            continue
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= have:
            raise invalid(name, value, f"this machine has {have} CUDA device(s): use 'cpu', or null (the model's).")


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _simple_type(hint: Any) -> tuple[type | None, bool]:
    """(int|float|bool|str, optional) for a plain or Optional hint; (None, _) for anything else."""
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)
    if is_union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SIMPLE:
            return rest[0], len(rest) < len(args)
        return None, False
    return (hint, False) if hint in _SIMPLE else (None, False)


def check_field_types(obj: Any, names: Iterable[str] | None = None) -> None:
    """Every plain int/float/bool/str field of dataclass `obj` (or Optional of one) holds a value of that type (an int
    is a float; a bool is not a number); other fields are left to their own checks."""
    hints = typing.get_type_hints(type(obj))
    wanted = set(names) if names is not None else None
    for f in fields(obj):
        if not f.init or (wanted is not None and f.name not in wanted):
            continue
        kind, optional = _simple_type(hints.get(f.name))
        value = getattr(obj, f.name)
        if kind is None or (value is None and optional):
            continue
        if kind is float:
            ok = is_number(value)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise invalid(f.name, value, f"use {_SIMPLE[kind]}{' or null' if optional else ''}.")


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise `NonFiniteError` naming `what` and the first key whose tensor holds NaN or inf."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite(value):
            bad = int(scalar((~torch.isfinite(value)).sum()))
            raise NonFiniteError(
                f"{what}: {key!r} holds {bad} NaN/inf value(s) of {value.numel()}; nothing was written."
            )


def check_data_files(name: str, value: Any) -> None:
    """null, a file (pattern), a list of them, or a mapping split -> file(s), e.g. {train: a.parquet, test: b.csv}."""
    if value is None:
        return

    def files_ok(v: Any) -> bool:
        if isinstance(v, str):
            return bool(v)
        return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)

    per_split = isinstance(value, Mapping) and bool(value)
    if not files_ok(value) and not (per_split and all(isinstance(k, str) and files_ok(v) for k, v in value.items())):
        raise invalid(name, value, "give files per split as a mapping, e.g. '{train: a.parquet, test: b.parquet}'.")


def check_output_dir(value: Any, name: str = "output_dir") -> None:
    """A folder path: an existing folder, or a new one that can be made — no file (or broken link) at the path or at
    a folder above it, which the Trainer would only trip over once the model and data are loaded. Reads only; a value
    that is not a path is left to the type checks."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        return
    path = Path(os.path.expanduser(value))
    if path.is_symlink() and not path.exists():
        raise invalid(name, os.fspath(value), "is a broken link: remove it or give another folder.")
    if path.exists() and not path.is_dir():
        raise invalid(name, os.fspath(value), "is a file, not a folder: give a folder (existing or new) for the run.")
    for above in path.absolute().parents:  # the nearest existing folder above must be a folder, not a file
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                fix = f"{os.fspath(above)!r} is a file, so no folder can be made under it: give another output path."
                raise invalid(name, os.fspath(value), fix)
            return


def _check_trainer_choices(args) -> None:
    """TrainingArguments' string choices, checked here so a bad one is a clear error before anything runs."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
    from transformers.trainer_utils import HubStrategy, IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames

    enums = {"lr_scheduler_type": SchedulerType, "optim": OptimizerNames, "eval_strategy": IntervalStrategy}
    enums.update(logging_strategy=IntervalStrategy, save_strategy=SaveStrategy)
    if not hasattr(args, "push_continual_state"):  # PMConfig gives hub_strategy a sequence's meaning
        enums["hub_strategy"] = HubStrategy
    for name, enum in enums.items():
        value = getattr(args, name)
        check_choice(name, value.value if isinstance(value, enum) else value, [e.value for e in enum])
    reporters = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
    for name in reporters:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise invalid(
                "report_to", args.report_to, f"use 'none', 'all' or some of {sorted(INTEGRATION_TO_CALLBACK)}."
            )
        if name not in get_available_reporting_integrations():
            raise invalid("report_to", args.report_to, f"{name} is not installed here; install it or leave it out.")


def _check_training_numbers(args) -> None:
    """The TrainingArguments numbers that the Trainer takes on trust (a 0 batch size divides by zero hours later)."""
    head_only = args.learning_rate == 0 and (args.head_learning_rate or 0) > 0  # lr 0 + a head lr: train the head
    check_number("learning_rate", args.learning_rate, 0, low_open=not head_only)
    if args.max_steps != -1:
        check_number("max_steps", args.max_steps, 1, integer=True)
    else:
        check_number("num_train_epochs", args.num_train_epochs, 0, low_open=True)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_number(name, getattr(args, name), 1, integer=True)
    check_number("seed", args.seed, 0, 2**31 - 1, integer=True)
    for name in ("weight_decay", "max_grad_norm", "warmup_steps", "dataloader_num_workers"):
        check_number(name, getattr(args, name), 0)
    for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        check_number(name, getattr(args, name), 0, 1, high_open=True)
    check_number("adam_epsilon", args.adam_epsilon, 0, low_open=True)
    for name in ("logging_steps", "save_steps"):
        check_number(name, getattr(args, name), 0, low_open=True)


def _check_trainer_mappings(args) -> None:
    """TrainingArguments' mapping fields: a mapping, a JSON object as text (or, for accelerator_config, a JSON file's
    path), or null; anything else fails deep in the Trainer (an int is even read as a file descriptor)."""
    for name in ("lr_scheduler_kwargs", "accelerator_config"):
        value = getattr(args, name)
        if value is None or isinstance(value, dict) or type(value).__name__ == "AcceleratorConfig":
            continue
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                if isinstance(json.loads(value), dict):
                    continue
            except ValueError:
                pass
            raise invalid(name, value, "as text, give a JSON object ('{\"key\": 1}'), or a mapping in the YAML file.")
        if isinstance(value, str) and name == "accelerator_config" and os.path.isfile(value):
            continue
        where = " (or the path of a JSON file that holds one)" if name == "accelerator_config" else ""
        raise invalid(name, value, f"give a mapping{where}, or leave it unset.")


def check_training_arguments(args) -> None:
    """The TrainingArguments fields that the Trainer takes on trust, and its string choices."""
    _check_training_numbers(args)
    _check_trainer_choices(args)
    _check_trainer_mappings(args)


def check_loop_training(args) -> None:
    """What a continual run's task Trainers cannot do: they get no eval split (every seen task is evaluated after
    each merge instead, `eval/continual/*`), and their batches name the labels 'labels'."""
    evaluates = {"eval_strategy": lambda v: str(getattr(v, "value", v)) != "no", "eval_on_start": bool,
                 "load_best_model_at_end": bool}  # fmt: skip
    for name, on in evaluates.items():
        value = getattr(args, name, None)
        if on(value):
            fix = "a task's Trainer has no eval split: pm_hf evaluates every seen task after each merge instead"
            raise invalid(name, getattr(value, "value", value), fix + " (eval/continual/*). Leave it unset.")
    if args.label_names not in (None, ["labels"]):
        raise invalid("label_names", args.label_names, "pm_hf's batches name their labels 'labels': leave it unset.")
