"""Merge strategies: one class each, registered by name (`merge_method`). See `base.py`."""

from . import alpha, olora, osf, task_vectors, validated  # noqa: F401  (registers the strategies)
from .base import (
    RETIRED,
    STRATEGIES,
    MergeContext,
    MergePlan,
    MergeStrategy,
    StartPoint,
    build_strategy,
    check_merge_args,
    get_strategy,
    merge_task,
    register,
    resolved_knobs,
)

__all__ = [
    "RETIRED",
    "STRATEGIES",
    "MergeContext",
    "MergePlan",
    "MergeStrategy",
    "StartPoint",
    "build_strategy",
    "check_merge_args",
    "get_strategy",
    "merge_task",
    "register",
    "resolved_knobs",
]
