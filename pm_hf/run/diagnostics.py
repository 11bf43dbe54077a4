"""Whether a task learned, said after each task: a classifier's accuracy within its own classes before the merge
against chance; for a task without classes (instruction tuning), whether its training loss fell. A task that did not
learn is merged all the same (the run goes on), but the console, the tracker and results.json (`warnings`) name it,
with the figures and the usual causes."""

from __future__ import annotations

from collections.abc import Sequence

CHANCE_MARGIN = 0.25  # near chance: less than a quarter of the way from chance to a perfect score
LOSS_FALL = 0.05  # the loss fell: its last logged value at least 5% under its first
CAUSES = "usual causes: a learning rate too low or too high, too few steps, labels that do not match the inputs"


def near_chance(accuracy: float, num_classes: int, margin: float = CHANCE_MARGIN) -> bool:
    """True when `accuracy` over `num_classes` classes is closer to chance (1 / num_classes) than `margin` of the
    way from chance to 1."""
    chance = 1.0 / num_classes
    return accuracy < chance + margin * (1.0 - chance)


def loss_fell(losses: Sequence[float], fall: float = LOSS_FALL) -> bool | None:
    """Whether the last logged training loss is at least `fall` (relative) under the first; None with fewer than two
    logged values (nothing to compare)."""
    if len(losses) < 2:
        return None
    return losses[-1] <= (1.0 - fall) * losses[0]


def training_losses(log_history: Sequence[dict]) -> list[float]:
    """The training losses a Trainer logged (`state.log_history`), in order."""
    return [float(entry["loss"]) for entry in log_history if "loss" in entry]


def learning_warnings(task: str, within: float | None, num_classes: int, losses: Sequence[float]) -> list[str]:
    """The warnings of one task: `within` is its accuracy within its own classes before the merge (None where the
    task has no classes, e.g. instruction tuning), `losses` its logged training losses. A classifier is judged by its
    accuracy (a loss can stop falling because the task was learned within the first logging window); a task without
    classes by its loss."""
    fell = loss_fell(losses)
    trend = f"; its training loss went {losses[0]:.4g} -> {losses[-1]:.4g}" if fell is not None else ""
    if within is not None and num_classes >= 2:
        if not near_chance(within, num_classes):
            return []
        return [
            f"{task} did not learn: its accuracy within its own {num_classes} classes before the merge is "
            f"{within:.1%} (chance {1 / num_classes:.1%}){trend}; {CAUSES}."
        ]
    if fell is False:
        return [f"{task}: the training loss did not fall ({losses[0]:.4g} -> {losses[-1]:.4g}); {CAUSES}."]
    return []
