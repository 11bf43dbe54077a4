"""Branch sampling for the P&M perturbation (docs/method.md, stage 1): one draw b in {-1, 0, +1} per optimizer step,
derived only from (seed, task index, optimizer step). It touches no global RNG, so every rank and every
gradient-accumulation micro-batch of a step sees the same branch, and `perturbation='none'` leaves the random
streams of a plain `Trainer` run untouched."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BRANCHES = (-1, 0, 1)


def _rng(seed: int, task_index: int, step: int, stream: int = 0) -> np.random.Generator:
    for name, value in (("seed", seed), ("task_index", task_index), ("step", step)):
        if value < 0:
            raise ValueError(f"`{name}` = {value} must be >= 0 to derive the perturbation branch.")
    return np.random.default_rng([int(seed), int(task_index), int(step), stream])


def sample_branch(seed: int, task_index: int, step: int, probs: Sequence[float]) -> int:
    """The branch b of optimizer step `step` of task `task_index`.

    Args:
        seed: the run's seed (`TrainingArguments.seed`).
        task_index: 0-based index of the task being trained.
        step: the optimizer step (`TrainerState.global_step`, shared by the step's micro-batches).
        probs: probabilities of (-1, 0, +1).

    Returns:
        -1, 0 or +1.
    """
    u = _rng(seed, task_index, step).random()
    cumulative = np.cumsum(np.asarray(probs, dtype=np.float64))
    return BRANCHES[min(int(np.searchsorted(cumulative, u, side="right")), 2)]


def noise_seed(seed: int, task_index: int, step: int) -> int:
    """A torch seed for the Gaussian-noise ablation at this step (independent of the branch draw)."""
    return int(_rng(seed, task_index, step, stream=1).integers(0, 2**62))


def expected_curvature_weight(eps: float, probs: Sequence[float]) -> float:
    """lambda in E[L(theta + b eps Delta)] ~ L + lambda Delta^T H Delta: (p- + p+) eps^2 / 2."""
    return (probs[0] + probs[2]) * eps * eps / 2.0
