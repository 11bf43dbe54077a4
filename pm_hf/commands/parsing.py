"""Config parsing for `pm-hf train`: YAML first, then command-line flags override it (as TRL's
`TrlParser.parse_args_and_config`), one flag per field of the six argument groups, presets. Every config problem
(unknown or renamed key or flag, bad value, missing `output_dir`) is an `InputError` raised before anything is trained
or written; the CLI turns it into `pm-hf: error: ...` and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..config.groups import (
    RENAMED_FIELDS,
    DataArguments,
    FisherArguments,
    LoraArguments,
    MergeArguments,
    ModelArguments,
    PMConfig,
)
from ..config.presets import PRESETS, RECOMMENDED_PRESET, get_preset
from ..errors import InputError, invalid
from ..heads.alignment import HeadAlignment
from ..method.strategies import check_merge_args
from .usage import HELP_HINT, TRAIN_DESCRIPTION, USAGE, InputErrors, did_you_mean  # noqa: F401 (USAGE re-exported)

DATACLASSES = (ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments)
ParsedArgs = tuple[ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments]


class Parser(InputErrors, HfArgumentParser):
    """`HfArgumentParser` that raises `InputError` instead of exiting, and shows one help group per dataclass.

    Fields inherited from a parent dataclass (`TrainingArguments` under `PMConfig`) get their own group, listed last,
    so the P&M fields are not buried among ~150 Trainer flags.
    """

    def __init__(self, dataclass_types=None, **kwargs):
        self._inherited: list[tuple[type, list[argparse.Action]]] = []
        super().__init__(dataclass_types, **kwargs)
        for base, actions in sorted(self._inherited, key=lambda item: item[0].__module__.startswith("transformers")):
            self._move_to_group(actions, f"{base.__name__} (inherited)", _first_line(base.__doc__))

    def _add_dataclass_arguments(self, dtype):
        start = len(self._actions)
        super()._add_dataclass_arguments(dtype)
        actions = self._actions[start:]
        bases = [b for b in dtype.__mro__[1:] if dataclasses.is_dataclass(b)]
        owner = {}  # field -> the base that declares it (the most basic one)
        for base in reversed(bases):
            owner.update({f.name: base for f in dataclasses.fields(base) if f.name not in owner})
        self._move_to_group([a for a in actions if a.dest not in owner], dtype.__name__, _first_line(dtype.__doc__))
        for base in bases:
            mine = [a for a in actions if owner.get(a.dest) is base]
            if mine:
                self._inherited.append((base, mine))

    def _move_to_group(self, actions: list[argparse.Action], title: str, description: str | None) -> None:
        group = self.add_argument_group(title, description)
        for action in actions:
            if action in self._optionals._group_actions:
                self._optionals._group_actions.remove(action)
                group._group_actions.append(action)


def _first_line(doc: str | None) -> str | None:
    return doc.strip().splitlines()[0] if doc else None


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    is_union = typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)
    return args[0] if is_union and len(args) == 1 else tp


def _structured_container(tp: Any) -> type | None:
    """`dict` for mapping fields, `list` for lists of lists/mappings; None for fields argparse handles natively."""
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp) or tp
    if origin is dict:
        return dict
    if origin is list:
        (item,) = typing.get_args(tp) or (None,)
        if (typing.get_origin(item) or item) in (list, dict):
            return list
    return None


GIVEN = "\x1f"  # around the text a structured field could not read, in its argparse message (`usage.InputErrors`)


def _example(name: str, hint: Any) -> str:
    """A value of a structured field's kind, for its error message."""
    tp = _strip_optional(hint)
    if (typing.get_origin(tp) or tp) is dict:
        return "a mapping, e.g. '{train: a.parquet}'" if name == "data_files" else "a mapping, e.g. '{key: value}'"
    (item,) = typing.get_args(tp) or (None,)
    if (typing.get_origin(item) or item) is dict:
        return "a list of mappings, e.g. '[{dataset_name: parquet, data_files: {train: a.parquet}}]'"
    return "a list of lists, e.g. '[[0, 1], [2, 3]]'"


def _yaml_value(name: str, container: type, example: str = "value"):
    """argparse `type` reading one YAML/JSON value (a mapping or a list) for a structured field; what it cannot
    read is reported as `invalid value: <text>: <fix>` (`usage.InputErrors` makes it `<field> = <text>: <fix>`)."""

    def parse(text):
        if not isinstance(text, str):
            return text  # a value from the YAML config, already structured
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            reason = " ".join(str(err).split())
            raise argparse.ArgumentTypeError(
                f"invalid value: {GIVEN}{text}{GIVEN}: not YAML/JSON ({reason}); give {example}"
            ) from None
        if value is not None and not isinstance(value, container):
            raise argparse.ArgumentTypeError(f"invalid value: {GIVEN}{text}{GIVEN}: give {example}")
        return value

    parse.__name__ = f"YAML/JSON {container.__name__}"
    return parse


def build_parser(cli_options: bool = False, prog: str = "pm-hf train") -> HfArgumentParser:
    """The `pm-hf train` parser: one flag per field of the six argument dataclasses (help text from their metadata).

    Args:
        cli_options: also document `--config` and `--resume` (for `--help`; `parse_config` does not take them).
        prog: program name shown in usage and help.

    Returns:
        An `HfArgumentParser` whose `error` raises `ValueError`, with `allow_abbrev=False` (a typo is never silently
        taken for a longer flag) and mapping/nested-list fields reading one YAML/JSON string from the command line.
    """
    usage = f"{prog} [-h] [--config FILE.yaml] [--preset NAME] [--resume] [--debug] [--<field> VALUE ...]"
    parser = Parser(DATACLASSES, prog=prog, usage=usage, description=TRAIN_DESCRIPTION, allow_abbrev=False)
    for dtype in DATACLASSES:
        for name, hint in typing.get_type_hints(dtype).items():
            container = _structured_container(hint)
            if container is None:
                continue
            for action in parser._actions:
                if action.dest == name:
                    action.type, action.nargs = _yaml_value(name, container, _example(name, hint)), None
                    action.metavar = "YAML"
    if cli_options:
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            default=None,
            help="YAML config: a flat mapping `field: value` of any fields below; flags given after it override it.",
        )
        parser.add_argument(
            "--preset",
            metavar="NAME",
            default=None,
            help=f"Named defaults applied first (config and flags override them): {sorted(PRESETS)}; "
            f"{RECOMMENDED_PRESET!r} is the recommended one for class-incremental classifiers.",
        )
        parser.add_argument(
            "--resume",
            action="store_true",
            help="Resume an interrupted run from the checkpoint in output_dir (goes on with the next unfinished task).",
        )
    return parser


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (plain PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise invalid(key, None, f"given twice (line {key_node.start_mark.line + 1}); keep one.")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_config(config_path: str | os.PathLike) -> dict[str, Any]:
    """Read a config file: a flat YAML mapping `field: value` (an empty file is an empty mapping).

    Raises:
        ValueError: the file is missing or unreadable, is not valid YAML, repeats a key, or is not a mapping.
    """
    path = os.fspath(config_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except FileNotFoundError:
        raise invalid("config", path, "not found; give the path of a YAML file.") from None
    except InputError:
        raise
    except (OSError, yaml.YAMLError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise invalid("config", path, f"not readable YAML ({reason}).") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        fix = f"must be a flat YAML mapping `field: value` at the top level, not a {type(data).__name__}; {HELP_HINT}."
        raise invalid("config", path, fix)
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise invalid("config", path, f"every key must be a field name (a string), not {bad!r}.")
    return dict(data)


def _check_renamed(values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name in RENAMED_FIELDS:
            raise invalid(name, value, f"{RENAMED_FIELDS[name]}.")


def _check_keys(config: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = {k: v for k, v in config.items() if k not in valid}
    _check_renamed(unknown)
    if unknown:
        (first, value), *more = unknown.items()
        also = "; also unknown: " + ", ".join(f"{k!r}{did_you_mean(k, valid)}" for k, _ in more) if more else ""
        fix = f"unknown field{did_you_mean(first, valid)}{also}. The config is a flat mapping `field: value`"
        raise invalid(first, value, f"{fix}; {HELP_HINT}.")


def _check_remaining(remaining: Sequence[str], valid: Sequence[str]) -> None:
    if not remaining:
        return
    flags = [r for r in remaining if r.startswith("-")]
    if not flags:
        raise invalid("arguments", list(remaining), "every value follows its --<field> flag.")
    name = flags[0].split("=", 1)[0].lstrip("-").replace("-", "_")
    i = remaining.index(flags[0])
    value = flags[0].split("=", 1)[1] if "=" in flags[0] else (remaining[i + 1] if i + 1 < len(remaining) else None)
    _check_renamed({name: value})
    also = "; also unknown: " + ", ".join(repr(f.split("=", 1)[0]) for f in flags[1:]) if flags[1:] else ""
    raise invalid(f"--{name}", value, f"unknown flag{did_you_mean(name, valid, '--')}{also}; {HELP_HINT}.")


def parse_config(config_path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> ParsedArgs:
    """YAML first, then command-line flags override it; every dataclass validates its own fields.

    Args:
        config_path: a flat YAML mapping `field: value` over the fields of the six dataclasses, or None (flags only);
            it may name a `preset` (see `pm_hf.config.presets`), whose fields it and the flags override.
        overrides: command-line tokens such as `["--perturb_eps", "0.25", "--output_dir", "out"]` (and
            `--preset NAME`, which wins over the file's `preset`).

    Returns:
        `(ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments)`.

    Raises:
        ValueError: an unknown key or flag (with the closest valid names), a config that is not a mapping, a
            missing `output_dir`, or a bad value (the dataclass's own message naming field, value and fix).
            Nothing is written to disk.
    """
    config = load_yaml_config(config_path) if config_path is not None else {}
    pre = Parser(None, add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=None)
    flags, overrides = pre.parse_known_args(list(overrides))
    preset = flags.preset if flags.preset is not None else config.pop("preset", None)
    config.pop("preset", None)
    parser = build_parser()
    valid = sorted({a.dest for a in parser._actions if a.dest != "help"})
    _check_keys(config, valid)
    if preset is not None:
        config = {**get_preset(str(preset)), **config}  # the file's own fields override the preset's
    parser.set_defaults(**config)  # argparse converts string defaults with the field's type, e.g. "5e-3" -> 0.005
    namespace, remaining = parser.parse_known_args(list(overrides))
    _check_remaining(remaining, valid)
    values = vars(namespace)
    if not values.get("output_dir"):
        raise invalid("output_dir", None, "required: set it in the YAML config or pass --output_dir DIR.")
    parsed = parser.parse_dict(values)
    check_merge_args(parsed[5])  # each strategy checks its own knobs, the head alignment its own
    HeadAlignment.check_args(parsed[5])
    return tuple(parsed)
