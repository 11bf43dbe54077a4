"""The merge coefficient across the class-incremental suites (docs/results.md, "The merge coefficient"): mean ACC of the
alpha rules that share the recommended head treatment, the bars the recommended preset has to meet on every suite,
and how well the quadratic model predicts the loss increase of a merge, raw and calibrated. Reads the committed
per-run JSON under `results/<suite>/runs/`; runs nothing.

    python scripts/alpha_table.py     # prints Markdown tables

Bars (per suite, on mean ACC over the seeds present): the preset >= `coma-proto`, `fixed-1-eps-proto` and
`sqrt-t-proto`, and at most 1 point below `oracle-alpha-proto`. Exit 1 when a bar fails or a suite lacks a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pm_hf.config.presets import RECOMMENDED_PRESET  # noqa: E402

SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")
METHODS = ("pm", "pm-proto", "pm-validated", "pm-validated-half", "pm-validated-first-1", "pm-validated-exact",
           "pm-validated-first", "pm-validated-revisit", "pm-validated-paired", "pm-validated-heldout",
           "pm-validated-calibrated", "pm-validated-slow", "pm-validated-slow-0.1", "pm-secant-proto",
           "pm-branch-proto", "pm-curve-proto", "coma-proto", "fixed-1-eps-proto", "sqrt-t-proto", "fixed-0.2-proto",
           "slow-proto", "seq-proto", "frozen-proto", "osf", "olora", "oracle-alpha-proto",
           "oracle-alpha-proto-first-0.5")  # fmt: skip
FLOOR = ("coma-proto", "fixed-1-eps-proto", "sqrt-t-proto")  # constants and schedules with the preset's head
RIVALS = ("slow-proto", "seq-proto", "frozen-proto", "osf", "olora")  # what a user would pick instead (docs/baselines)
ORACLE, ORACLE_GAP = "oracle-alpha-proto", 1.0


def load_accs(suite: str) -> dict[str, list[float]]:
    """ACC (%) of every finished run of `suite`, per method, in seed order."""
    accs: dict[str, list[float]] = {}
    for path in sorted((ROOT / "results" / suite / "runs").glob("*/seed*.json")):
        run = json.loads(path.read_text())
        accs.setdefault(run["method"], []).append(100 * run["acc"])
    return accs


def cell(values: list[float] | None) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f} ({len(values)})"


def check_bars(accs: dict[str, list[float]], preset: str) -> list[str]:
    """The bars the preset fails on one suite (empty: all met); a missing method is a failure."""
    if not accs.get(preset):
        return [f"no {preset} run"]
    mean = statistics.fmean(accs[preset])
    failed = [f"{m} missing" for m in (*FLOOR, *RIVALS, ORACLE) if not accs.get(m)]
    failed += [f"< {m} by {statistics.fmean(accs[m]) - mean:.1f}" for m in (*FLOOR, *RIVALS)
               if accs.get(m) and statistics.fmean(accs[m]) > mean]  # fmt: skip
    if accs.get(ORACLE) and statistics.fmean(accs[ORACLE]) - mean > ORACLE_GAP:
        failed.append(f"{statistics.fmean(accs[ORACLE]) - mean:.1f} below {ORACLE}")
    return failed


def loss_prediction(suite: str) -> tuple[float, float, int] | None:
    """Median over merged tasks (alpha < 1, measured increase > 0) of predicted / measured loss increase, raw and
    calibrated, over every run of `suite` that logged both."""
    raw, calibrated = [], []
    for path in sorted((ROOT / "results" / suite / "runs").glob("*/seed*.json")):
        for row in json.loads(path.read_text()).get("loss_increases") or []:
            if row and row.get("alpha", 1.0) < 1.0 and row.get("measured", 0) > 0 and "predicted_calibrated" in row:
                raw.append(row["predicted"] / row["measured"])
                calibrated.append(row["predicted_calibrated"] / row["measured"])
    return (statistics.median(raw), statistics.median(calibrated), len(raw)) if raw else None


def tables() -> tuple[str, str, bool]:
    """The two Markdown tables of docs/results.md ("The merge coefficient"; written there by scripts/doc_figures.py)
    and whether every bar is met."""
    accs = {suite: load_accs(suite) for suite in SUITES}
    lines = ["| method | " + " | ".join(SUITES) + " |", "|---|" + "---|" * len(SUITES)]
    for m in METHODS:
        name = f"**{m}** (preset)" if m == RECOMMENDED_PRESET else m
        lines.append(f"| {name} | " + " | ".join(cell(accs[s].get(m)) for s in SUITES) + " |")
    bars = {suite: check_bars(accs[suite], RECOMMENDED_PRESET) for suite in SUITES}
    lines.append(
        "| bars met by the preset | " + " | ".join("yes" if not b else "; ".join(b) for b in bars.values()) + " |"
    )
    loss = [
        "| suite | predicted / measured loss increase, raw Fisher (median) | calibrated | merges |",
        "|---|---|---|---|",
    ]
    for suite in SUITES:
        pred = loss_prediction(suite)
        if pred:
            loss.append(f"| {suite} | {pred[0]:.4f} | {pred[1]:.2f} | {pred[2]} |")
    return "\n".join(lines), "\n".join(loss), not any(bars.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    acc, loss, met = tables()
    print(acc + "\n\n" + loss)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
