"""The errors a run reports to its user (stdlib only, so the CLI can catch them without importing torch):
`InputError` (bad input, `<field> = <value>: <fix>`, exit 2), `NonFiniteError` (a tensor holds NaN or inf) and
`DivergenceError` (the loss diverged). `pm_hf.config.checks` and `pm_hf.method.trainer` re-export them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


class InputError(ValueError):
    """A bad config value, data or model folder, found before anything is written: `<field> = <value>: <fix>`."""


class NonFiniteError(ValueError):
    """A tensor about to be used or written holds NaN or inf (nothing was written)."""


class DivergenceError(RuntimeError):
    """Training produced a NaN/inf loss, or one above `divergence_threshold` times the task's first loss."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(name: Any) -> str:
    """The field as one printable token: a name with spaces or unprintable characters (an unknown key or flag as
    typed) is shown escaped, so the error stays one line whose field is one word."""
    text = str(name)
    if text and text.isprintable() and not any(c.isspace() for c in text):
        return text
    return ascii(text).replace(" ", "\\x20")


def invalid(name: str, value: Any, fix: str) -> InputError:
    """The error for a bad value: `<field> = <value>: <fix>`."""
    return InputError(f"{_field(name)} = {_show(value)}: {fix}")


def python_names(message: str, groups: Mapping[str, str], flags: Mapping[str, str]) -> str:
    """`message` as a Python user reads it: the field it names and every `--field` given with its argument
    (`groups`: field -> the argument holding it, e.g. 'resume_from' -> 'args': `args.resume_from`), and the CLI's own
    flags (`flags`: e.g. 'resume' -> 'train(resume_from_checkpoint=True)') spelled as in Python."""
    field, sep, rest = message.partition(" = ")
    if sep and field in groups:
        message = f"{groups[field]}.{field} = {rest}"

    def spell(match: re.Match) -> str:
        name = match[1]
        return flags.get(name) or (f"{groups[name]}.{name}" if name in groups else match[0])

    return re.sub(r"--(\w+)", spell, message)


class MissingExtraError(ImportError):
    """An optional dependency is not installed: the message names the extra that installs it."""


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Raise `MissingExtraError` unless every one of `modules` can be imported (checked without importing them)."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        names = ", ".join(missing)
        raise MissingExtraError(f"{what} needs {names}, not installed: pip install 'pm_hf[{extra}]'.")
