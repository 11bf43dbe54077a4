"""The sources of the figures: the committed results/ and a few formatting helpers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from pm_hf.config.presets import RECOMMENDED_PRESET

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
ACCURACY_SUITES = ("vision-cil", "text-cil", "vision-cil-10", "text-cil-10", "llm-instruct", "llm-instruct-long")
README_SUITES = ("vision-cil", "text-cil", "vision-cil-10", "text-cil-10")
PRESET, ORACLE = RECOMMENDED_PRESET, "oracle-alpha-proto"
BOUNDS = ("joint", "oracle-alpha", "oracle-alpha-proto", "oracle-alpha-proto-first-0.5")  # upper bounds, not methods


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def summary(suite: str) -> dict:
    return _json(RESULTS / suite / "summary.json")


def runs(suite: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in sorted((RESULTS / suite / "runs").glob("*/seed*.json")):
        run = _json(path)
        out.setdefault(run["method"], []).append(run)
    return out


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def mean_std(row: dict, key: str = "acc") -> str:
    return f"{pct(row[key]['mean'])} ± {pct(row[key]['std'])}"


def span(values: list[float], scale: float = 100, digits: int = 0) -> str:
    lo, hi = min(values) * scale, max(values) * scale
    return f"{lo:.{digits}f}–{hi:.{digits}f}" if f"{lo:.{digits}f}" != f"{hi:.{digits}f}" else f"{lo:.{digits}f}"


def para(text: str) -> str:
    """A generated sentence, wrapped at 120 columns like the hand-written prose."""
    return textwrap.fill(text, 120, break_long_words=False, break_on_hyphens=False)


def aligned(row: dict) -> bool:
    return (row.get("align_over_train") or 0.0) > 0
