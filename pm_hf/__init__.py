"""pm_hf: Perturb-and-Merge (P&M) continual LoRA fine-tuning on the Hugging Face stack.

Public API: `PMConfig` and `PMTrainer` (train with perturbation), `estimate_fisher` (diagonal Fisher at the trained
weights), `merge_task` with a strategy from `pm_hf.strategies` (closed-form alpha and the baselines),
`ContinualCallback` (hooks of the loop), `ContinualTrainer` (the whole sequence, from Python) and `run_continual`
(the same from the six argument groups of a YAML config). The math is in `pm_hf.merge`,
the PEFT plumbing in `pm_hf.adapters`; docs/method.md is the specification.
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
    "merge_task",
    "run_continual",
]


def __getattr__(name: str):
    if name in ("ContinualTrainer", "run_continual"):  # the loop imports datasets and the evaluation stack: lazily
        from . import continual

        return getattr(continual, name)
    raise AttributeError(f"module 'pm_hf' has no attribute {name!r}")
