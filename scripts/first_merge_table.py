"""The first merge at alpha = 0.5 (`pm-validated-half`) against 1 (`pm-validated-first-1`), from their committed runs
(docs/results.md, "The first merge"): ACC per seed and the difference of the means; then, per seed, what the second
merge's estimate (held-out data of task 2, drift-widened statistics of task 1: what the rule reads, no eval split)
says of each first merge: its score at the alpha it chose and its best over the grid scanned, with the best's standard
error, beside the run's final ACC. Whether the second task's data could choose the first alpha: the first merge whose
best estimate is higher would be taken. Then the rule at 0.5 against the greedy oracle from each first merge
(`oracle-alpha-proto` from 1, `oracle-alpha-proto-first-0.5` from a first merge at 0.5; both train on all of each
task's data, the rule without the tenth it holds out): how much of its distance from the oracle is the first
merge's, and how much the later merges' (with that tenth). And the preset's own first merge (`pm-validated`):
how far the whole first adapter moved its held-out features, per seed, the alpha that took, and the final ACC beside
the two fixed rules'. Runs nothing.

    python scripts/first_merge_table.py [--results results]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")
RULES = {0.5: "pm-validated-half", 1.0: "pm-validated-first-1"}


def load(results: Path, suite: str, method: str) -> dict[int, dict]:
    """The runs of `method` on `suite`, by seed."""
    runs = (json.loads(p.read_text()) for p in (results / suite / "runs" / method).glob("seed*.json"))
    return {run["seed"]: run for run in sorted(runs, key=lambda run: run["seed"])}


def second_merge(run: dict) -> tuple[float, float, float]:
    """(estimate at the chosen alpha, best estimate scanned, its standard error) of the run's second merge."""
    calibration = run["calibrations"][1]
    grid = {float(a): m for a, m in calibration["grid"].items()}
    best = max(grid.values(), key=lambda m: m["estimate"])
    return grid[float(calibration["alpha"])]["estimate"], best["estimate"], best["se"]


def higher(values: dict[float, float]) -> float | None:
    """The first alpha whose value is higher; None for a tie."""
    (a, x), (b, y) = values.items()
    return None if x == y else (a if x > y else b)


def acc_table(results: Path) -> list[str]:
    out = ["| suite | α_1 = 0.5 (`pm-validated-half`) | α_1 = 1 (`pm-validated-first-1`) | difference |"]
    out.append("|---|---|---|---|")
    for suite in SUITES:
        accs = {a: [100 * r["acc"] for r in load(results, suite, m).values()] for a, m in RULES.items()}
        cells = [" / ".join(f"{v:.1f}" for v in accs[a]) + f": {statistics.fmean(accs[a]):.1f}" for a in RULES]
        diff = statistics.fmean(accs[0.5]) - statistics.fmean(accs[1.0])
        out.append(f"| {suite} | {cells[0]} | {cells[1]} | {f'{diff:+.1f}'.replace('-', '−')} |")
    return out


def estimate_table(results: Path) -> tuple[list[str], str]:
    """The second merge's estimates per pair of runs (suite, seed), and a summary: for each of the estimate at the
    chosen alpha and the best scanned, in how many pairs the higher one's run has the higher final ACC (ties left
    out); how many pairs' bests are further apart than one standard error of their difference."""
    out = [
        "| suite | seed | α_1 = 0.5: chosen / best ± se → ACC | α_1 = 1: chosen / best ± se → ACC "
        "| best gap / se of the gap | higher chosen picks | higher best picks |",
        "|---|---|---|---|---|---|---|",
    ]
    right: dict[str, list[bool]] = {"chosen": [], "best": []}
    apart = pairs = 0
    for suite in SUITES:
        runs = {a: load(results, suite, m) for a, m in RULES.items()}
        for seed in runs[0.5]:
            est = {a: second_merge(runs[a][seed]) for a in RULES}
            acc = {a: 100 * runs[a][seed]["acc"] for a in RULES}
            gap = (est[0.5][1] - est[1.0][1]) / math.hypot(est[0.5][2], est[1.0][2])
            apart, pairs = apart + (abs(gap) > 1), pairs + 1
            cells = [f"{est[a][0]:.3f} / {est[a][1]:.3f} ± {est[a][2]:.3f} → {acc[a]:.1f}" for a in RULES]
            for k, which in enumerate(right):
                pick = higher({a: est[a][k] for a in RULES})
                if pick is not None:
                    right[which].append(acc[pick] > max(v for a, v in acc.items() if a != pick))
                cells.append("tie" if pick is None else f"{pick:g} (the {'better' if right[which][-1] else 'worse'})")
            shown = f"{gap:+.2f}" if abs(gap) >= 0.005 else "0.00"
            out.append(f"| {suite} | {seed} | {cells[0]} | {cells[1]} | {shown} | {cells[2]} | {cells[3]} |")
    picks = "; ".join(f"by the {k} estimate, {sum(r)} of {len(r)}" for k, r in right.items())
    summary = (
        f"The higher estimate picks the run with the higher final ACC ({pairs} pairs, ties left out): {picks}. The two "
        f"bests are further apart than one standard error of their difference in {apart} of {pairs} pairs."
    )
    return out, summary


COLUMNS = {
    "α_1 = 0.5 (`pm-validated-half`)": "pm-validated-half",
    "oracle from α_1 = 1 (`oracle-alpha-proto`)": "oracle-alpha-proto",
    "oracle from α_1 = 0.5 (`oracle-alpha-proto-first-0.5`)": "oracle-alpha-proto-first-0.5",
}


def bound_table(results: Path) -> list[str]:
    """Mean ACC (per-seed values) of the rule at 0.5 and of the greedy oracle from either first merge, per suite; the
    oracles' difference (the first merge's part of the rule's distance) and the oracle from 0.5 less the rule."""
    head = " | ".join(COLUMNS) + " | oracle from 1 − from 0.5 | oracle from 0.5 − `pm-validated-half`"
    out = [f"| suite | {head} |", "|---|---|---|---|---|---|"]
    for suite in SUITES:
        accs = {m: [100 * r["acc"] for r in load(results, suite, m).values()] for m in COLUMNS.values()}
        mean = {m: statistics.fmean(a) if a else None for m, a in accs.items()}
        cells = [" / ".join(f"{v:.1f}" for v in accs[m]) + f": {mean[m]:.1f}" if accs[m] else "—" for m in accs]
        whole, half = mean["oracle-alpha-proto"], mean["oracle-alpha-proto-first-0.5"]
        preset = mean["pm-validated-half"]
        parts = [f"{a - b:+.1f}" if None not in (a, b) else "—" for a, b in ((whole, half), (half, preset))]
        out.append(f"| {suite} | {' | '.join(cells)} | {' | '.join(p.replace('-', '−') for p in parts)} |")
    return out


def first_moves(runs: dict[int, dict]) -> tuple[str, str]:
    """The preset's first move and the alpha it took, per seed ("a / b / c")."""
    moves = " / ".join(f"{r['calibrations'][0]['first_move']['move']:.2f}" for r in runs.values())
    return moves, " / ".join(f"{r['alphas'][0]:g}" for r in runs.values())


def move_table(results: Path) -> list[str]:
    """Per suite: the preset's first move per seed (`calibrations[0]["first_move"]`), the alpha it took, and the final
    ACC per seed of the preset and of the two fixed rules."""
    out = [
        "| suite | move of the held-out features (seeds 0 / 1 / 2) | α_1 taken | ACC: the preset | α_1 = 0.5 "
        "| α_1 = 1 |",
        "|---|---|---|---|---|---|",
    ]
    for suite in SUITES:
        moves, taken = first_moves(load(results, suite, "pm-validated"))
        accs = [[100 * r["acc"] for r in load(results, suite, m).values()] for m in ("pm-validated", *RULES.values())]
        cells = [" / ".join(f"{v:.1f}" for v in a) + f": {statistics.fmean(a):.1f}" for a in accs]
        out.append(f"| {suite} | {moves} | {taken} | {' | '.join(cells)} |")
    return out


CHECKS = ("vision-cil-fashion", "text-cil-10-order1")  # sequences the limit was not set on
CHECK_METHODS = ("pm-validated", "pm-validated-half", "pm-validated-first-1", "slow-proto", "frozen-proto",
                 "oracle-alpha-proto")  # fmt: skip


def check_table(results: Path) -> list[str]:
    """Per check suite: the preset's move and alpha per seed, and the mean ACC (per-seed values) of the preset, the two
    fixed rules, the strongest rivals and the oracle ("—": not run there)."""
    head = " | ".join(f"`{m}`" for m in CHECK_METHODS)
    out = [f"| suite | move (seeds 0 / 1 / 2) | α_1 taken | {head} |", "|---|---|---|" + "---|" * len(CHECK_METHODS)]
    for suite in CHECKS:
        moves, taken = first_moves(load(results, suite, "pm-validated"))
        cells = []
        for method in CHECK_METHODS:
            accs = [100 * r["acc"] for r in load(results, suite, method).values()]
            each = " / ".join(f"{v:.1f}" for v in accs)
            cells.append(f"{statistics.fmean(accs):.1f} ({each})" if accs else "—")
        out.append(f"| {suite} | {moves} | {taken} | {' | '.join(cells)} |")
    return out


def tables(results: Path) -> tuple[str, str, str, str, str]:
    """The ACC table, the second merge's table with its summary, the bounds, the preset's first moves, the checks on
    sequences the limit was not set on (docs/results.md's five figures)."""
    table, summary = estimate_table(results)
    acc, bounds = "\n".join(acc_table(results)), "\n".join(bound_table(results))
    moves, checks = "\n".join(move_table(results)), "\n".join(check_table(results))
    return acc, "\n".join(table) + "\n\n" + summary, bounds, moves, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder (committed runs)")
    print("\n\n".join(tables(parser.parse_args().results)))


if __name__ == "__main__":
    main()
