"""The knobs of merge strategies and of the closed form's calibrations, in the style of mergekit's `parameters()`: a
class lists the knobs it reads in `knobs`, each either the name of a `MergeArguments` field (its default there) or a
`Knob` the class declares itself (its default and check with it). A declared knob is set in a config under
`merge_parameters`, so a new rule with new knobs is one class and `MergeArguments` does not change."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...config.checks import invalid
from ...config.groups import MergeArguments

FIELDS = {f.name for f in dataclasses.fields(MergeArguments)}


@dataclass(frozen=True)
class Knob:
    """A knob declared by the class that reads it; `check(name, value)` raises `invalid(name, value, fix)`."""

    name: str
    default: Any = None
    check: Callable[[str, Any], None] | None = None
    help: str = ""
    before: str = ""  # how a run record that lacks it (in `merge_knobs`) may have resolved it, where not as `default`


DECLARED: dict[str, Knob] = {}  # every declared knob of a registered class, by name (one name, one meaning)


def knob_names(owner) -> list[str]:
    """The names of the knobs `owner` (a strategy or calibration class) reads, from its `parameters()`."""
    return [k if isinstance(k, str) else k.name for k in owner.parameters()]


def declare(owner) -> None:
    """Make the `Knob`s of a class being registered settable under `merge_parameters`."""
    for knob in owner.parameters():
        if isinstance(knob, str):
            if knob not in FIELDS:
                raise ValueError(f"{owner.__name__}: knob {knob!r} is no MergeArguments field: declare it as a Knob")
            continue
        if knob.name in FIELDS or DECLARED.get(knob.name, knob) != knob:
            raise ValueError(f"{owner.__name__}: knob {knob.name!r} is already a knob with another meaning")
        DECLARED[knob.name] = knob


class KnobValues:
    """Every knob of a `MergeArguments` as an attribute: its fields, then `merge_parameters`, then the declared
    defaults (what the strategies' and calibrations' `check(values)` read)."""

    def __init__(self, args: MergeArguments):
        self._args = args

    def __getattr__(self, name: str):
        args = self.__dict__["_args"]
        if name in FIELDS:
            return getattr(args, name)
        params = args.merge_parameters or {}
        if name in params:
            return params[name]
        if name in DECLARED:
            return DECLARED[name].default
        raise AttributeError(name)


def read_knobs(owner, args: MergeArguments) -> dict[str, Any]:
    """The values of `owner`'s knobs in `args`."""
    values = KnobValues(args)
    return {name: getattr(values, name) for name in knob_names(owner)}


def declared_values(owner, args: MergeArguments) -> dict[str, Any]:
    """The values of the knobs `owner` declares itself (not `MergeArguments` fields) in `args`, defaults included: what
    a run record keeps beside its arguments, so that a resume where a default changed since is refused."""
    return {name: value for name, value in read_knobs(owner, args).items() if name not in FIELDS}


def unrecorded_changes(saved_parameters: dict | None, resolved: dict[str, Any]) -> list[str]:
    """The declared knobs `resolved` by this pm_hf that a saved run record's `merge_knobs` lacks (it kept none, or a
    knob was added since): those it may have resolved otherwise (a `before`) and its `merge_parameters` did not set,
    each as a difference to report."""
    unset = [n for n in sorted(resolved) if n in DECLARED and DECLARED[n].before and n not in (saved_parameters or {})]
    return [
        f"merge knob {n} (not recorded by the pm_hf that saved the run): may have been {DECLARED[n].before} -> "
        f"{resolved[n]!r}"
        for n in unset
    ]


def default_knobs(owner) -> dict[str, Any]:
    return read_knobs(owner, MergeArguments())


def check_parameters(args: MergeArguments) -> None:
    """`merge_parameters` names declared knobs only (a field is set as a field), each value passing its check."""
    params = args.merge_parameters or {}
    if not isinstance(params, dict):
        raise invalid("merge_parameters", params, "give a mapping of knob names to values, e.g. {my_knob: 0.5}.")
    for name in params:
        if name in FIELDS:
            raise invalid("merge_parameters", params, f"{name!r} is a field of its own: set `{name}` directly.")
        if name not in DECLARED:
            raise invalid("merge_parameters", params, f"{name!r} is no knob of a strategy: use {sorted(DECLARED)}.")
    values = KnobValues(args)
    for knob in DECLARED.values():
        if knob.check is not None:
            knob.check(knob.name, getattr(values, knob.name))


def registrar(table: dict, what: str):
    """A class decorator that registers a class under its unique `name` in `table` (a strategy, a calibration), its
    knobs declared."""

    def register(cls):
        if not cls.name or cls.name in table:
            raise ValueError(f"{what} {cls.__name__}: a unique `name` is required (got {cls.name!r})")
        declare(cls)
        table[cls.name] = cls
        return cls

    return register
