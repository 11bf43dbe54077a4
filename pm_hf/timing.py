"""The one timing helper: named wall-clock intervals that add up (`timings` of results.json)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timer:
    """`with timer("fisher"): ...` adds the block's seconds to `timer.seconds["fisher"]`. Intervals nest without
    counting twice: while an inner block runs, the outer one is paused (a Fisher computed on demand inside the merge
    stays "fisher" time), so the named seconds still add up to the wall-clock time."""

    def __init__(self, *names: str):
        self.seconds: dict[str, float] = dict.fromkeys(names, 0.0)
        self._running: list[str] = []  # the open intervals, innermost last; only the innermost is counting
        self._since = 0.0

    def _charge(self, now: float) -> None:
        if self._running:
            name = self._running[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._running.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._running.pop()
