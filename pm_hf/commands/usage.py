"""What `pm-hf` shows before any work: the usage text and a parser whose errors are `InputError`s. Stdlib and
`pm_hf.errors` only: no torch or transformers, so `pm-hf --help` and every subcommand's `--help` answer at once
(`pm_hf.commands.parsing` builds the full `train` parser from the argument dataclasses)."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence

from ..errors import InputError, invalid

HELP_HINT = "run `pm-hf train --help` to list every field"
USAGE = """usage: pm-hf <command> [options]

commands:
  train     --config FILE.yaml [--preset NAME] [--resume] [--debug] [--<field> value ...]
            continual LoRA fine-tuning with Perturb-and-Merge (`pm-hf train --help` lists every field)
  check     FILE.yaml [--preset NAME] [--resume] [--debug] [--<field> value ...]
            validate a train config and its data without loading the model or writing anything; print the plan
  evaluate  RUN_DIR | EXPORT_DIR_OR_HUB_ID --config DATA.yaml [--revision REV] [--debug]
            re-evaluate a saved run (or score an export or Hub model on a data config) on every task
  export    RUN_DIR --output DIR [--mode adapter|adapter-svd|merged|per-task] [--rank K]
            write the merged model as a folder that loads alone (pm_hf.load_export; AutoModelFor... when merged)
  push      RUN_DIR --hub_model_id USER/NAME [--private] [--revision BRANCH] [--push_continual_state]
            [--overwrite_hub_state]
            push a finished run's merged adapter, model card and plots to the Hub
  merge     --adapters A B ... --output DIR [--merge_method NAME] [--config DATA.yaml]
            merge trained LoRA adapters of one base in order (the Fisher from each task's data in --config)

Bad input prints `pm-hf: error: <field> = <value>: <fix>` and exits 2 before anything is written; --debug shows the
traceback instead.
"""
CHECK_HELP = """usage: pm-hf check FILE.yaml [-h] [--preset NAME] [--resume] [--debug] [--<field> value ...]

Run the checks `pm-hf train` makes before it loads a model, on the same config and flags (`pm-hf train --help` lists
the fields): the config's values, the launch, the output folder, the strategy, and the data (every task's splits,
columns and classes, built as the run builds them). Only the tokenizer or processor and the model's config are loaded;
nothing is written (the datasets cache aside). Then print what the run would do: its tasks, classes, training samples
and optimizer steps per task, the strategy and its calibration, the head alignment, where it writes and what it
pushes. Exit 0 when valid; otherwise `pm-hf: error: <field> = <value>: <fix>` and exit 2.

options:
  FILE.yaml      the config (or --config FILE.yaml)
  --preset NAME  named defaults applied first, as with train
  --resume       check a resume of the run in output_dir (a folder holding a run is then accepted)
  --debug        show the traceback of an error
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
        required = re.match(r"the following arguments are required: (.*)", message)
        if required:
            names = [n.strip() for n in required.group(1).split(",")]
            also = f" (also {', '.join(names[1:])})" if names[1:] else ""
            raise invalid(names[0].lstrip("-"), None, f"required: give {names[0]}{also}; see --help.")
        unknown = re.match(r"unrecognized arguments: (\S+)\s*(\S*)", message)
        if unknown:
            flag, value = unknown.group(1).split("=", 1)[0], unknown.group(2) or None
            options = [o for action in self._actions for o in action.option_strings]
            raise invalid(flag, value, f"unknown option{did_you_mean(flag, options)}; see `{self.prog} --help`.")
        match = re.match(r"argument --([\w-]+)[^:]*: (.*)", message)
        if not match:
            raise InputError(f"arguments = {message}: {HELP_HINT}.")
        name, problem = match.group(1).replace("-", "_"), match.group(2)
        given = re.match(r"invalid value: \x1f(.*)\x1f: (.*)$", problem, re.S)  # a structured field's own message
        if given:
            raise invalid(name, given.group(1), f"{given.group(2).rstrip('.')}.")
        truthy = re.match(
            r"Truthy value expected: got (.*) but expected one of (.*?)( \(case insensitive\))?\.?$", problem
        )
        if truthy:  # transformers' `string_to_bool`
            raise invalid(name, truthy.group(1), f"use one of {truthy.group(2)}.")
        value = re.search(r"value: (.*)$", problem)
        raise invalid(name, value.group(1).strip("'") if value else None, f"{problem.rstrip('.')}.")


class ArgParser(InputErrors, argparse.ArgumentParser):
    """The parser of the subcommands other than `train`, and of `train`'s own options (--config, --resume, ...);
    its help shows defaults, as `HfArgumentParser`'s; an unknown option is an error, never an abbreviation."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a typo is never taken for a longer option (--privat: --private)
        super().__init__(*args, **kwargs)
