"""How well `validated-alpha`'s estimate stands for what it estimates: from the runs of the diagnostics method
`pm-validated-diag` (pm-validated-exact scanning the whole grid, each alpha's eval-split score logged beside its
estimate, after the choice: `validation_log_eval`), committed apart from the suite's runs under
results/<suite>/validation_truth/seed*.json (the runner's runs/pm-validated-diag/ copied there, so that the suite's
table keeps its methods), per suite over every merge after the first:

- the estimate's bias (estimate - eval, accuracy points) at alpha = 0 and alpha = 1;
- the alpha the rule chose (one-standard-error rule on the estimate) and the grid's best alpha on the eval splits;
- the accuracy the choice gave up at that merge against the best on the grid (greedy: later merges start from the
  choice, so this is not the sequence's loss), and the estimate's standard error there (what it can resolve);
- the same for two other choices from the same grids (the best estimate without the one-standard-error margin, and
  the best of the estimate smoothed over neighbouring grid points).

    python scripts/validation_truth.py [SUITE ...]     (default: every suite with committed runs of the method)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
METHOD = "pm-validated-diag"


def merges(run: dict) -> list[dict[float, dict]]:
    """Each merge's grid after the first, alpha -> {estimate, se, new, old, eval}, every point with its eval."""
    out = []
    for record in run["calibrations"][1:]:
        grid = {float(a): m for a, m in record["grid"].items()}
        if not all("eval" in m for m in grid.values()):
            raise ValueError(f"seed {run['seed']}: a grid point without its eval score (not a {METHOD} run)")
        out.append(grid)
    return out


def merge_facts(grid: dict[float, dict], chosen: float) -> dict[str, float]:
    """One merge: the bias at the grid's ends, the chosen and the eval-best alpha (the first best), the regret."""
    best = max(sorted(grid), key=lambda a: grid[a]["eval"])
    low, high = min(grid), max(grid)
    return {
        "bias_low": 100 * (grid[low]["estimate"] - grid[low]["eval"]),
        "bias_high": 100 * (grid[high]["estimate"] - grid[high]["eval"]),
        "chosen": chosen,
        "best": best,
        "regret": 100 * (grid[best]["eval"] - grid[chosen]["eval"]),
        "se": 100 * grid[chosen]["se"],
    }


def suite_row(runs: list[dict]) -> dict[str, float]:
    facts = [merge_facts(g, run["alphas"][t + 1]) for run in runs for t, g in enumerate(merges(run))]
    row = {k: statistics.mean(f[k] for f in facts) for k in facts[0]}
    row.update(merges=len(facts), seeds=len(runs), hits=sum(f["chosen"] == f["best"] for f in facts))
    return row


def argmax_choice(grid: dict[float, dict]) -> float:
    """The grid alpha with the best estimate (the smallest on ties): no standard-error margin."""
    return max(sorted(grid), key=lambda a: grid[a]["estimate"])


def smoothed_choice(grid: dict[float, dict]) -> float:
    """The best alpha of the estimate averaged over each grid point and its neighbours (the smallest on ties)."""
    alphas = sorted(grid)
    values = [grid[a]["estimate"] for a in alphas]
    smooth = [statistics.mean(values[max(0, i - 1) : i + 2]) for i in range(len(alphas))]
    return alphas[max(range(len(alphas)), key=lambda i: (smooth[i], -i))]


# other choices from the same logged grids, at the states the preset's run went through (greedy, like the regret)
OTHER_CHOICES = {"best estimate": argmax_choice, "best smoothed estimate": smoothed_choice}


def other_regrets(runs: list[dict]) -> dict[str, float]:
    """Per rule of OTHER_CHOICES: the mean accuracy (points) its choice gives up against the grid's eval-best."""
    grids = [g for run in runs for g in merges(run)]
    top = [max(m["eval"] for m in g.values()) for g in grids]
    return {
        name: statistics.mean(100 * (b - g[choose(g)]["eval"]) for g, b in zip(grids, top, strict=True))
        for name, choose in OTHER_CHOICES.items()
    }


def table(suites: list[str], results: Path = RESULTS) -> str:
    lines = [
        "| suite | seeds | merges | estimate - eval at α = 0 (points) | at α = 1 | α chosen (mean) | eval-best α "
        "(mean) | merges where they agree | accuracy given up per merge (points) | the estimate's standard error "
        "at the choice (points) | given up by the best estimate / the best smoothed estimate (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for suite in suites:
        paths = sorted((results / suite / "validation_truth").glob("seed*.json"))
        if not paths:
            continue
        runs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
        r, others = suite_row(runs), other_regrets(runs)
        lines.append(
            f"| {suite} | {r['seeds']} | {r['merges']} | {r['bias_low']:+.1f} | {r['bias_high']:+.1f} | "
            f"{r['chosen']:.2f} | {r['best']:.2f} | {r['hits']} of {r['merges']} | {r['regret']:.1f} | {r['se']:.1f} | "
            + " / ".join(f"{v:.1f}" for v in others.values())
            + " |"
        )
    return "\n".join(lines)


SUITES = ["vision-cil", "vision-cil-10", "text-cil", "text-cil-10"]

if __name__ == "__main__":
    print(table(sys.argv[1:] or SUITES))
