"""How far `validated-alpha`'s interpolated features (`validation_features: interpolated`, the preset) move its
estimate from the exact rule's (a features pass per trial, `pm-validated-exact`), from the committed runs: over every
merge whose earlier alphas the two runs of a suite and seed share (the same merged model before it), the estimate at
each grid point both scanned, at the knots (where it must be equal) and between them (the chord), and whether the
choice is the same. Runs nothing.

    python scripts/validation_chord.py [--results results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pm_hf.method.strategies.validated import ValidatedAlpha

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")
KNOTS = next(k.default for k in ValidatedAlpha.knobs if not isinstance(k, str) and k.name == "validation_knots")


def shared_merges(chord: dict, exact: dict) -> list[tuple[dict, dict, float, float]]:
    """(chord grid, exact grid, chord alpha, exact alpha) of each merge after the first whose earlier alphas agree."""
    out = []
    for t in range(1, min(len(chord["alphas"]), len(exact["alphas"]))):
        if chord["alphas"][:t] != exact["alphas"][:t]:
            break
        grids = (chord["calibrations"][t]["grid"], exact["calibrations"][t]["grid"])
        out.append((*grids, chord["alphas"][t], exact["alphas"][t]))
    return out


def table(results: Path) -> str:
    lines = ["| suite | merges shared | same choice | at the knots: largest difference | between: mean (largest), n |",
             "|---|---|---|---|---|"]  # fmt: skip
    for suite in SUITES:
        merges, same, at_knots, between = 0, 0, [], []
        for path in sorted((results / suite / "runs" / "pm-validated").glob("seed*.json")):
            exact_path = path.parent.parent / "pm-validated-exact" / path.name
            chord, exact = json.loads(path.read_text()), json.loads(exact_path.read_text())
            for ours, theirs, a, b in shared_merges(chord, exact):
                merges, same = merges + 1, same + (a == b)
                for alpha in set(ours) & set(theirs):
                    diff = 100 * (ours[alpha]["estimate"] - theirs[alpha]["estimate"])
                    (at_knots if float(alpha) in KNOTS else between).append(diff)
        knot = max((abs(d) for d in at_knots), default=0.0)
        mean = statistics.mean(between) if between else float("nan")
        top = max(between, key=abs) if between else float("nan")
        lines.append(f"| {suite} | {merges} | {same} | {knot:.2f} | {mean:+.2f} ({top:+.2f}), {len(between)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    print(table(parser.parse_args().results))


if __name__ == "__main__":
    main()
