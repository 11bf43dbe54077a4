"""Perturb-and-Merge with TRL's `SFTTrainer` (the `pm_hf[trl]` extra): `PMSFTConfig` is an `SFTConfig` with the
perturbation fields, `PMSFTTrainer` is `SFTTrainer` with `PerturbationMixin` in front of it. TRL keeps what it does
(prompt-completion formatting, completion-only loss, packing); each optimizer step runs at the perturbed point.

    trainer = PMSFTTrainer(model=peft_model, args=PMSFTConfig(output_dir="out", perturb_eps=0.5), train_dataset=ds)
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from ..config.groups import PerturbationArguments
from .trainer import PerturbationMixin


@dataclass
class PMSFTConfig(SFTConfig, PerturbationArguments):
    """`trl.SFTConfig` plus `PerturbationArguments` (perturbation, perturb_eps, perturb_probs, ...)."""

    def __post_init__(self):
        self.check_perturbation()
        super().__post_init__()


class PMSFTTrainer(PerturbationMixin, SFTTrainer):
    """`trl.SFTTrainer` whose training step runs inside the P&M perturbation of the active LoRA adapter: give it a
    PEFT model (or a `peft_config`) and a `PMSFTConfig`."""
