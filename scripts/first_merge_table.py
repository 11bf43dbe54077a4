"""The first merge at alpha = 0.5 (`pm-validated`) against 1 (`pm-validated-first-1`), from their committed runs
(docs/results.md, "The first merge"): ACC per seed and the difference of the means; then, per seed, what the second
merge's estimate (held-out data of task 2, drift-widened statistics of task 1: what the rule reads, no eval split)
says of each first merge: its score at the alpha it chose and its best over the grid scanned, with the best's standard
error, beside the run's final ACC. Whether the second task's data could choose the first alpha: the first merge whose
best estimate is higher would be taken. Runs nothing.

    python scripts/first_merge_table.py [--results results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")
RULES = {0.5: "pm-validated", 1.0: "pm-validated-first-1"}


def load(results: Path, suite: str, method: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / suite / "runs" / method).glob("seed*.json"))]


def second_merge(run: dict) -> tuple[float, float, float]:
    """(estimate at the chosen alpha, best estimate scanned, its standard error) of the run's second merge."""
    calibration = run["calibrations"][1]
    grid = {float(a): m for a, m in calibration["grid"].items()}
    best = max(grid.values(), key=lambda m: m["estimate"])
    return grid[float(calibration["alpha"])]["estimate"], best["estimate"], best["se"]


def acc_table(results: Path) -> list[str]:
    out = ["| suite | α_1 = 0.5 (`pm-validated`) | α_1 = 1 (`pm-validated-first-1`) | difference |"]
    out.append("|---|---|---|---|")
    for suite in SUITES:
        accs = {a: [100 * r["acc"] for r in load(results, suite, m)] for a, m in RULES.items()}
        cells = [" / ".join(f"{v:.1f}" for v in accs[a]) + f": {statistics.fmean(accs[a]):.1f}" for a in RULES]
        diff = statistics.fmean(accs[0.5]) - statistics.fmean(accs[1.0])
        out.append(f"| {suite} | {cells[0]} | {cells[1]} | {f'{diff:+.1f}'.replace('-', '−')} |")
    return out


def estimate_table(results: Path) -> tuple[list[str], int, int]:
    """The second merge's estimates per run pair; how many pairs the higher best estimate would pick the first alpha
    with the higher final ACC; how many pairs' bests lie within one standard error of each other."""
    out = [
        "| suite | seed | α_1 = 0.5: chosen / best ± se → ACC | α_1 = 1: chosen / best ± se → ACC "
        "| higher best picks |",
        "|---|---|---|---|---|",
    ]
    right = close = 0
    for suite in SUITES:
        runs = {a: load(results, suite, m) for a, m in RULES.items()}
        for seed, (half, whole) in enumerate(zip(runs[0.5], runs[1.0], strict=True)):
            est = {0.5: second_merge(half), 1.0: second_merge(whole)}
            acc = {0.5: 100 * half["acc"], 1.0: 100 * whole["acc"]}
            pick = max(est, key=lambda a: est[a][1])
            right += acc[pick] >= max(acc.values())
            close += abs(est[0.5][1] - est[1.0][1]) <= max(est[0.5][2], est[1.0][2])
            cells = [f"{est[a][0]:.3f} / {est[a][1]:.3f} ± {est[a][2]:.3f} → {acc[a]:.1f}" for a in RULES]
            verdict = "the better" if acc[pick] >= max(acc.values()) else "the worse"
            out.append(f"| {suite} | {seed} | {cells[0]} | {cells[1]} | {pick:g} ({verdict}) |")
    return out, right, close


def tables(results: Path) -> tuple[str, str]:
    """The ACC table, and the second merge's table with its one-line summary (docs/results.md's two figures)."""
    table, right, close = estimate_table(results)
    pairs = len(table) - 2
    summary = (
        f"The higher best estimate picks the first α with the higher final ACC in {right} of {pairs} pairs; the two "
        f"bests lie within one standard error of each other in {close} of {pairs}."
    )
    return "\n".join(acc_table(results)), "\n".join(table) + "\n\n" + summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder (committed runs)")
    print("\n\n".join(tables(parser.parse_args().results)))


if __name__ == "__main__":
    main()
