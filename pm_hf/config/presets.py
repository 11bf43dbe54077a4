"""Named presets: a few `field: value` defaults under one name (`preset: pm-proto` in a YAML config, or
`--preset pm-proto`). The config file and command-line flags override a preset's fields.

- `pm`: P&M exactly as specified (docs/method.md): closed-form alpha, task-vector perturbation, no head refit.
- `pm-proto`: `pm` plus the class-balanced head alignment
  (`head_align: prototypes`, `head_align_drift: sdc`). After each merge every seen class's head row is refitted on
  pseudo-features drawn from per-class feature means (moved along the feature drift measured on the new task's
  data) and one shared covariance, kept in the continual state (fixed size, no old data). The merged backbone is
  exactly `pm`'s; only the head changes. Causal LMs have no class head: for them docs/llm.md gives the measured
  recommended settings (`pm` with `perturbation: none`, `fisher_normalize: mean`). Measurements: docs/results.md.
- `pm-validated` (recommended for class-incremental classifiers): `pm-proto`'s training and head, with alpha chosen
  per task by `validated-alpha` (an estimate of the accuracy over all seen classes from the task's held-out training
  data and the drift-widened class statistics; no eval data, docs/method.md), the first task merged whole where its
  adapter moves the features of its held-out rows by at most 5 times their spread, else at 0.5. Causal LMs:
  docs/llm.md.
"""

from __future__ import annotations

from typing import Any

from ..errors import invalid

PRESETS: dict[str, dict[str, Any]] = {
    "pm": {"merge_method": "pm", "perturbation": "task_vector", "head_align": "none"},
    "pm-proto": {
        "merge_method": "pm",
        "perturbation": "task_vector",
        "head_align": "prototypes",
        "head_align_drift": "sdc",
    },
    "pm-validated": {
        "merge_method": "validated-alpha",
        "perturbation": "task_vector",
        "head_align": "prototypes",
        "head_align_drift": "sdc",
    },
}
RECOMMENDED_PRESET = "pm-validated"


def get_preset(name: str) -> dict[str, Any]:
    """The fields of preset `name` (a copy).

    Raises:
        ValueError: an unknown name, naming the valid ones.
    """
    if name not in PRESETS:
        raise invalid("preset", name, f"not a preset; use one of {sorted(PRESETS)} (or leave it out).")
    return dict(PRESETS[name])
