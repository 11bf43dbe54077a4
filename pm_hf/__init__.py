"""pm_hf: Perturb-and-Merge (P&M) continual LoRA fine-tuning on the Hugging Face stack.

Public API: `PMConfig` and `PMTrainer` (train with perturbation), `estimate_fisher` (diagonal Fisher at the trained
weights), `merge_task` with a strategy from `pm_hf.strategies` (closed-form alpha and the baselines),
`ContinualCallback` (hooks of the loop), `ContinualTrainer` (the whole sequence, from Python) and `run_continual`
(the same from the six argument groups of a YAML config); `export_run_dir`, `push_run_dir`, `evaluate_export`,
`load_export` (a saved run or an export, `pm_hf.runs`) and `merge_adapters` (post-hoc, `pm_hf.posthoc`). The math
is in `pm_hf.merge`, the PEFT plumbing in `pm_hf.adapters`; docs/method.md is the specification.
"""

from .callbacks import ContinualCallback
from .config import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig
from .fisher import estimate_fisher
from .strategies import build_strategy, merge_task
from .trainer import PMTrainer

__version__ = "0.2.0"
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
LAZY = {  # name -> module: the loop imports datasets and the evaluation stack, so these load on first use
    "ContinualTrainer": "continual",
    "run_continual": "continual",
    "export_run_dir": "runs",
    "push_run_dir": "runs",
    "evaluate_export": "runs",
    "load_export": "runs",
    "merge_adapters": "posthoc",
}


def __getattr__(name: str):
    if name in LAZY:  # the loop imports datasets and the evaluation stack: lazily
        import importlib

        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pm_hf' has no attribute {name!r}")
