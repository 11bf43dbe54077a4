"""What `pm-hf` shows before any work: the usage text, a parser whose errors are `InputError`s, and the help of
`pm-hf train`. Stdlib and `pm_hf.errors` only: no torch or transformers, so `pm-hf --help` and every subcommand's
`--help` answer at once (`pm_hf.parsing` builds the full `train` parser from the argument dataclasses)."""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import InputError, invalid

HELP_HINT = "run `pm-hf train --help` to list every field"
USAGE = """usage: pm-hf <command> [options]

commands:
  train     --config FILE.yaml [--preset NAME] [--resume] [--debug] [--<field> value ...]
            continual LoRA fine-tuning with Perturb-and-Merge (`pm-hf train --help` lists every field)
  evaluate  RUN_DIR | EXPORT_DIR_OR_HUB_ID --config DATA.yaml [--revision REV] [--debug]
            re-evaluate a saved run (or score an export or Hub model on a data config) on every task
  export    RUN_DIR --output DIR [--mode adapter|adapter-svd|merged|per-task] [--rank K]
            write the merged model as a folder that loads alone (AutoPeftModelFor... or AutoModelFor...)
  push      RUN_DIR --hub_model_id USER/NAME [--private] [--revision BRANCH] [--push_continual_state]
            push a finished run's merged adapter, model card and plots to the Hub
  merge     --adapters A B ... --output DIR [--merge_method NAME] [--config DATA.yaml]
            merge trained LoRA adapters of one base in order (the Fisher from each task's data in --config)

Bad input prints `pm-hf: error: <field> = <value>: <fix>` and exits 2 before anything is written; --debug shows the
traceback instead.
"""
TRAIN_DESCRIPTION = (
    "Continual LoRA fine-tuning with Perturb-and-Merge. Values come from --config (a flat YAML mapping "
    "`field: value` of the fields below), then command-line flags override them; an unknown key or flag is an error. "
    "Mappings and nested lists (data_files, task_datasets, class_groups) take one YAML/JSON value on the command "
    "line, e.g. --data_files '{train: a.parquet, test: b.parquet}' or --class_groups '[[0, 1], [2, 3]]'. "
    "--debug shows the traceback of an error (TrainingArguments' own `debug` field can be set in the YAML file)."
)


def did_you_mean(name: str, valid: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""


class InputErrors:
    """Mixin for an `argparse.ArgumentParser`: a complaint raises `InputError` (`<field> = <value>: <fix>`) instead
    of exiting, so the CLI reports it as every other bad input."""

    def error(self, message: str):
        match = re.match(r"argument --([\w-]+)[^:]*: (.*)", message)
        if not match:
            raise InputError(f"arguments = {message}: {HELP_HINT}.")
        name, problem = match.group(1).replace("-", "_"), match.group(2)
        value = re.search(r"value: (.*)$", problem)
        raise invalid(name, value.group(1).strip("'") if value else None, f"{problem}.")


class ArgParser(InputErrors, argparse.ArgumentParser):
    """The parser of the subcommands other than `train`, and of `train`'s own options (--config, --resume, ...);
    its help shows defaults, as `HfArgumentParser`'s."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _help_cache_key() -> str:
    """What the `train` help depends on: pm_hf's sources (the argument dataclasses, presets), the installed
    transformers (TrainingArguments' fields), this interpreter and the terminal width (argparse wraps to it)."""
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    try:
        digest.update(version("transformers").encode())
    except PackageNotFoundError:
        pass
    digest.update(f"{sys.version}|{sys.prefix}|{shutil.get_terminal_size().columns}".encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def help_cache_dir() -> Path:
    return Path(os.environ.get("PM_HF_CACHE") or Path.home() / ".cache" / "pm_hf") / "help"


def train_help() -> str:
    """The text of `pm-hf train --help`. Its ~200 fields come from `TrainingArguments`, whose import takes seconds, so
    the text is kept in `${PM_HF_CACHE:-~/.cache/pm_hf}/help/` under a key of everything it depends on: the first
    call builds it, later ones read it (an unwritable cache only costs the rebuild)."""
    path = help_cache_dir() / f"train-{_help_cache_key()}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    from .parsing import build_parser

    text = build_parser(cli_options=True).format_help()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        for old in path.parent.glob("train-*.txt"):  # texts of older sources or versions
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass
    return text
