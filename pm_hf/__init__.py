"""pm_hf: Perturb-and-Merge (P&M) continual LoRA fine-tuning on the Hugging Face stack.

Public API: `PMConfig` and `PMTrainer` (train with perturbation), `estimate_fisher` (diagonal Fisher at the trained
weights), `merge_task` with a strategy from `pm_hf.method.strategies` (closed-form alpha and the baselines),
`ContinualCallback` (hooks of the loop), `ContinualTrainer` (the whole sequence, from Python) and `run_continual`
(the same from the six argument groups of a YAML config); `export_run_dir`, `push_run_dir`, `evaluate_export`,
`load_export` (a saved run or an export, `pm_hf.run.runs`) and `merge_adapters` (post-hoc, `pm_hf.run.posthoc`). The
math
is in `pm_hf.method.merge`, the PEFT plumbing in `pm_hf.method.adapters`; docs/method.md is the specification.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` below imports each name on first use
    from .config.groups import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig
    from .continual import ContinualTrainer, run_continual
    from .method.callbacks import ContinualCallback
    from .method.fisher import estimate_fisher
    from .method.strategies import build_strategy, merge_task
    from .method.trainer import PMTrainer
    from .run.posthoc import merge_adapters
    from .run.runs import evaluate_export, export_run_dir, load_export, push_run_dir

from .version import __version__ as __version__  # (re-exported)

__all__ = [
    "ContinualCallback",
    "ContinualTrainer",
    "DataArguments",
    "FisherArguments",
    "LoraArguments",
    "MergeArguments",
    "ModelArguments",
    "PMConfig",
    "PMTrainer",
    "build_strategy",
    "estimate_fisher",
    "evaluate_export",
    "export_run_dir",
    "load_export",
    "merge_adapters",
    "merge_task",
    "push_run_dir",
    "run_continual",
]
# name -> the module that defines it. Importing `pm_hf` loads none of them (nor torch or transformers), so
# `pm-hf --help` and light tools stay fast; each loads on first use, e.g. `from pm_hf import PMConfig`.
LAZY = {
    "ContinualCallback": "method.callbacks",
    "ContinualTrainer": "continual",
    "DataArguments": "config.groups",
    "FisherArguments": "config.groups",
    "LoraArguments": "config.groups",
    "MergeArguments": "config.groups",
    "ModelArguments": "config.groups",
    "PMConfig": "config.groups",
    "PMTrainer": "method.trainer",
    "build_strategy": "method.strategies",
    "estimate_fisher": "method.fisher",
    "evaluate_export": "run.runs",
    "export_run_dir": "run.runs",
    "load_export": "run.runs",
    "merge_adapters": "run.posthoc",
    "merge_task": "method.strategies",
    "push_run_dir": "run.runs",
    "run_continual": "continual",
}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
        globals()[name] = value  # found once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'pm_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
