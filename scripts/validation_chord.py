"""How far `validated-alpha`'s interpolated features (`validation_features: interpolated`, the preset's) move its
estimate from the exact rule's (a features pass per trial, `pm-validated-exact`), from the committed runs of the two
with the first task at alpha = 1 (`pm-validated-first-1`, the preset's runs until stop 44, against the exact's): over
every merge whose earlier alphas the two runs of a suite and seed share (the same merged model before it), the
estimate at each grid point both scanned, at the knots (where it must be equal) and between them (the chord), and
whether the choice is the same; then, over every merge, the grid points each rule scans and the passes of the
training rows it takes. Runs nothing.

    python scripts/validation_chord.py [--results results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pm_hf.method.strategies.validated import ValidatedAlpha, scan
from pm_hf.run.measure import knots_around

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")
DEFAULTS = {k.name: k.default for k in ValidatedAlpha.knobs if not isinstance(k, str)}
KNOTS = DEFAULTS["validation_knots"]  # the preset's
CHORD = "pm-validated-first-1"  # interpolated features, the first task at 1: one knob from pm-validated-exact


def shared_merges(chord: dict, exact: dict) -> list[tuple[dict, dict, float, float]]:
    """(chord grid, exact grid, chord alpha, exact alpha) of each merge after the first whose earlier alphas agree."""
    out = []
    for t in range(1, min(len(chord["alphas"]), len(exact["alphas"]))):
        if chord["alphas"][:t] != exact["alphas"][:t]:
            break
        grids = (chord["calibrations"][t]["grid"], exact["calibrations"][t]["grid"])
        out.append((*grids, chord["alphas"][t], exact["alphas"][t]))
    return out


def scans(results: Path) -> str:
    """Over every merge of the committed runs of both: grid points scanned and passes of the training rows, the exact
    rule's recomputed from its whole grids as `scan` reaches them (its runs scanned the whole grid) with a pass at each
    point above 0, the preset's as logged with a pass at each knot its points needed above 0."""
    patience, stop_se = DEFAULTS["validation_patience"], DEFAULTS["validation_stop_se"]
    count = {"exact": [0, 0, 0, 0], "interpolated": [0, 0, 0, 0]}  # merges, points, passes, whole grids
    for path in sorted(p for suite in SUITES for p in (results / suite / "runs" / CHORD).glob("seed*.json")):
        exact_path = path.parent.parent / "pm-validated-exact" / path.name
        for name, run_path in (("interpolated", path), ("exact", exact_path)):
            for record in json.loads(run_path.read_text())["calibrations"]:
                if not record or "grid" not in record:
                    continue
                grid = {float(a): m for a, m in record["grid"].items()}
                if name == "exact":
                    grid = scan(list(grid), grid.__getitem__, patience, stop_se)
                needed = {k for a in grid for k in knots_around(KNOTS, a)} if name == "interpolated" else set(grid)
                for i, n in enumerate((1, len(grid), len(needed - {0.0}), len(grid) == 11)):
                    count[name][i] += n
    (m, p, q, w), (m2, p2, q2, w2) = count["exact"], count["interpolated"]
    return (f"Over the {m} merges (interpolated: {m2}): grid points scanned {p / m:.2f} per merge exact, "
            f"{p2 / m2:.2f} interpolated ({p} and {p2} head alignments); passes of the training rows {q} and {q2}; "
            f"whole grids scanned {w} and {w2}.")  # fmt: skip


def table(results: Path) -> str:
    lines = ["| suite | merges shared | same choice | at the knots: largest difference | between: mean (largest), n |",
             "|---|---|---|---|---|"]  # fmt: skip
    for suite in SUITES:
        merges, same, at_knots, between = 0, 0, [], []
        for path in sorted((results / suite / "runs" / CHORD).glob("seed*.json")):
            exact_path = path.parent.parent / "pm-validated-exact" / path.name
            chord, exact = json.loads(path.read_text()), json.loads(exact_path.read_text())
            for ours, theirs, a, b in shared_merges(chord, exact):
                merges, same = merges + 1, same + (a == b)
                for alpha in set(ours) & set(theirs):
                    diff = 100 * (ours[alpha]["estimate"] - theirs[alpha]["estimate"])
                    (at_knots if len(knots_around(KNOTS, float(alpha))) == 1 else between).append(diff)
        knot = max((abs(d) for d in at_knots), default=0.0)
        mean = statistics.mean(between) if between else float("nan")
        top = max(between, key=abs) if between else float("nan")
        lines.append(f"| {suite} | {merges} | {same} | {knot:.2f} | {mean:+.2f} ({top:+.2f}), {len(between)} |")
    return "\n".join(lines) + "\n\n" + scans(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    print(table(parser.parse_args().results))


if __name__ == "__main__":
    main()
