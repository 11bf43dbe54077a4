"""pm_hf: Perturb-and-Merge (P&M) continual LoRA fine-tuning on the Hugging Face stack.

Public API: `PMConfig` and `PMTrainer` (train with perturbation), `estimate_fisher` (diagonal Fisher at the trained
weights), `pm_hf.merge` (closed-form alpha and the S/G accumulators) and `pm_hf.adapters` (PEFT-side plumbing).
"""

from .config import FisherArguments, LoraArguments, MergeArguments, PMConfig
from .fisher import estimate_fisher
from .trainer import PMTrainer

__version__ = "0.1.0"
__all__ = ["FisherArguments", "LoraArguments", "MergeArguments", "PMConfig", "PMTrainer", "estimate_fisher"]
