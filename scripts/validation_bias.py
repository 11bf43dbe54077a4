"""How far `validated-alpha`'s estimate stands from the accuracy the run then measured, per part (docs/results.md,
"The old classes' width"): at every merge after the first, at the chosen alpha, the old classes' part (mean of their
pseudo-feature scores) against the mean eval accuracy of the earlier tasks after that merge, and the new classes'
held-out accuracy against the task's own eval accuracy. Reads the committed runs; diagnostics only.

    python scripts/validation_bias.py [--methods pm-validated-exact pm-validated-calibrated] [--results results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")


def merge_gaps(run: dict) -> list[tuple[float, float]]:
    """Per merge after the first: (old part - old tasks' eval accuracy, new part - the task's eval accuracy)."""
    out = []
    for t in range(1, len(run["alphas"])):
        calibration = run["calibrations"][t]
        chosen = calibration["grid"][str(float(calibration["alpha"]))]
        row = run["accuracy_matrix"][t]
        out.append((chosen["old"] - statistics.mean(row[:t]), chosen["new"] - row[t]))
    return out


def table(methods: list[str], results: Path) -> str:
    lines = ["| suite | method | merges | old part - eval (points, mean) | merges above | new part - eval (points) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for suite in SUITES:
        for method in methods:
            runs = sorted((results / suite / "runs" / method).glob("seed*.json"))
            gaps = [g for path in runs for g in merge_gaps(json.loads(path.read_text()))]
            if not gaps:
                continue
            old, new = [100 * g[0] for g in gaps], [100 * g[1] for g in gaps]
            above = sum(g > 0 for g in old)
            lines.append(f"| {suite} | {method} | {len(gaps)} | {statistics.mean(old):+.1f} | {above} of {len(gaps)} "
                         f"| {statistics.mean(new):+.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["pm-validated-exact", "pm-validated-calibrated"])
    parser.add_argument("--results", type=Path, default=ROOT / "results", help="the folder of the suites' runs")
    args = parser.parse_args(argv)
    print(table(args.methods, args.results))


if __name__ == "__main__":
    main()
