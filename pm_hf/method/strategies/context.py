"""`MergeContext`: what a strategy may ask for when it merges task t — the task vector, the task's Fisher, the
oracle's score(alpha) and the calibrated forms' `TaskProbe` — each computed on the strategy's first request and then
kept. A strategy pays only for what it asks for, and the loop hands every strategy the same context without knowing
which it will ask for."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..merge import TaskVector

Fisher = Mapping[str, torch.Tensor]
Score = Callable[[float], float]
NEEDS = ("fisher", "score", "probe", "validation", "reverted", "feature_move")


class MergeContext:
    """Task t's merge inputs. `MergeContext(t, vector, fisher=..., score=..., probe=...)` takes values known up front
    (tests, scripts, a post-hoc merge); `MergeContext.on_demand(t, vector, fisher=make_fisher, ...)` takes functions
    computing them (the loop's: a Fisher pass, a copy of the weights to move along the merge line)."""

    def __init__(self, t: int, vector: TaskVector, fisher: Fisher | None = None, score: Score | None = None,
                 probe=None):  # fmt: skip
        self.t, self.vector = t, vector
        given = {**dict.fromkeys(NEEDS), "fisher": fisher, "score": score, "probe": probe}
        self._make: dict[str, Callable[[], Any] | None] = {k: (lambda v=v: v) for k, v in given.items()}
        self._made: dict[str, Any] = {}

    @classmethod
    def on_demand(cls, t: int, vector: TaskVector, **make: Callable[[], Any] | None) -> MergeContext:
        """A context whose `fisher`, `score` and `probe` are made by the given functions when first asked for
        (None: the run cannot provide it; the strategy's own error says what it needed)."""
        unknown = set(make) - set(NEEDS)
        if unknown:
            raise TypeError(f"MergeContext provides {list(NEEDS)}, not {sorted(unknown)}")
        context = cls(t, vector)
        context._make.update(make)
        return context

    def _get(self, name: str):
        if name not in self._made:
            make = self._make.get(name)
            self._made[name] = None if make is None else make()
        return self._made[name]

    @property
    def fisher(self) -> Fisher | None:
        """The task's diagonal Fisher over `vector.deltas`, at theta*_t."""
        return self._get("fisher")

    @property
    def score(self) -> Score | None:
        """score(alpha): the held-out primary score on all seen tasks of theta_hat_{t-1} + alpha Delta_t."""
        return self._get("score")

    @property
    def validation(self) -> Callable[[float], dict] | None:
        """estimate(alpha): `validated-alpha`'s estimate of the seen accuracy, from the task's training data only."""
        return self._get("validation")

    @property
    def reverted(self) -> Callable[[float], dict] | None:
        """The same estimate along theta_0 + alpha Delta_t: the earlier merges undone (`validation_revisit_first`)."""
        return self._get("reverted")

    @property
    def feature_move(self) -> dict | None:
        """How far the whole task vector moves the features of the task's held-out rows (`move_ratio` from alpha 0
        to 1 along the merge line): {"move": ratio, "rows": count}."""
        return self._get("feature_move")

    @property
    def probe(self):
        """The task's `TaskProbe` (its loss along the merge line, its branch losses)."""
        return self._get("probe")

    def made(self, name: str):
        """`name`'s value if a strategy asked for it, else None (what the loop logs of it)."""
        return self._made.get(name)
