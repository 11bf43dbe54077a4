"""O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP Findings):
a new LoRA per task, trained with the orthogonality loss lambda_1 * sum_layers sum_{i < t} ||A_t A_i^T||_1 against
the frozen A of every earlier task (their code's `orthogonal_loss`, lambda_1 = 0.5), plus their optional
lambda_2 * sum ||.||_2 over the new A and B (0 in their scripts, as here by default). O-LoRA keeps every task's LoRA
and sums them: merged at alpha = 1 here (the earlier adapters live in the weights), their A kept for the loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...config.checks import check_number
from ..adapters import lora_weights
from ..trainer import LossTerm
from .alpha import SeqMerge
from .base import prefixed, register
from .knobs import Knob


def orthogonality_penalty(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """sum over layers of ||A_old A_new^T||_1 (entrywise), `old[key]` the earlier tasks' A stacked by rows (r_old x d),
    `new[key]` the trained A (r x d): O-LoRA's orthogonality loss before lambda_1. Layers without an old A add 0."""
    terms = [(old[k].to(a.device, a.dtype) @ a.T).abs().sum() for k, a in new.items() if k in old]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def l2_penalty(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """sum of the L2 (Frobenius) norms of the given matrices: O-LoRA's second term before lambda_2."""
    return torch.stack([p.norm() for p in params.values()]).sum() if params else torch.zeros(())


def _lambda(name: str, value) -> None:
    check_number(name, value, 0, None)


@register
class OLoRA(SeqMerge):
    name = "olora"
    shards = False
    reference = (
        "O-LoRA (Wang et al. 2023): a new LoRA per task, loss + lambda_1 sum ||A_t A_i^T||_1 over earlier tasks' A "
        "(+ lambda_2 sum ||A_t||_2 + ||B_t||_2), every task's LoRA kept (merged at alpha = 1)"
    )
    knobs = (
        Knob("olora_lambda", 0.5, _lambda, "lambda_1 of O-LoRA's orthogonality loss (theirs: 0.5)"),
        Knob("olora_l2", 0.0, _lambda, "lambda_2 of O-LoRA's L2 term on the new A and B (theirs: 0)"),
    )

    def __init__(self, **knobs):
        super().__init__(**knobs)
        self.old_A: dict[str, torch.Tensor] = {}  # merge key -> the earlier tasks' A, stacked (sum r x d_in)

    def callbacks(self, stream) -> list:
        return [OrthogonalityLoss(self)]

    def merge(self, context):
        for key, factors in context.vector.adapter.items():
            A = factors.A.float()
            self.old_A[key] = (
                A.clone() if key not in self.old_A else torch.cat([self.old_A[key], A.to(self.old_A[key])])
            )
        return super().merge(context)

    def loss(self, model) -> torch.Tensor:
        """lambda_1 * the orthogonality penalty of the model's A (+ lambda_2 * the L2 term)."""
        new = lora_weights(model, "A")
        loss = self.olora_lambda * orthogonality_penalty(new, self.old_A) if self.olora_lambda else 0.0
        if self.olora_l2:
            factors = {f"{k}/{part}": w for part in "AB" for k, w in lora_weights(model, part).items()}
            loss = loss + self.olora_l2 * l2_penalty(factors)
        return loss if isinstance(loss, torch.Tensor) else torch.zeros(())

    def state_dict(self):
        return {f"A/{k}": v for k, v in self.old_A.items()}

    def load_state_dict(self, state):
        self.old_A = prefixed(state, "A/")


class OrthogonalityLoss(LossTerm):
    """O-LoRA's loss terms, added to every training loss of a task (`PerturbationMixin.compute_loss`)."""

    def __init__(self, strategy: OLoRA):
        self.strategy = strategy

    def __call__(self, model) -> torch.Tensor:
        return self.strategy.loss(model)
