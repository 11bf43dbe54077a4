"""What the preset's first merge measures, beside what it cannot see (docs/results.md, "The first merge"): per suite
and seed, the preset (`pm-validated`) trains its first task as the benchmark runner does and stops at the first
merge. There, along theta_0 + alpha Delta_1 (alpha 0, 0.5, 1), it takes the head's input features of

- the first task's held-out tenth (what the rule reads: `feature_move`, the `first_move` the run logs);
- the eval splits of the tasks still to come (a diagnosis only, never read by the rule): their effective rank
  (exp of the entropy of the covariance's normalised eigenvalues; Roy and Vetterli 2007), how many directions the
  later classes' features spread over.

It writes `<out>/features.json` (docs/results.md's figure reads it) and prints the table. About 5 min for the four
suites' 12 runs on 2 CPU cores: the first task's training only.

    python scripts/first_merge_features.py [--seeds 3] [--out results/first-merge]
"""

# ruff: noqa: E402  (the offline switches must be set before transformers is imported)
from __future__ import annotations

import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark
from bench_suites.methods import METHODS

from pm_hf.commands.parsing import parse_config
from pm_hf.config.groups import RunConfig
from pm_hf.continual import build_loop
from pm_hf.run.measure import alignment_of, feature_move

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("vision-cil", "vision-cil-10", "text-cil", "text-cil-10")
ALPHAS = (0.0, 0.5, 1.0)


class FirstMerge(Exception):
    """Raised at the first merge once its features are taken: the run goes no further."""


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised eigenvalues of the covariance of the rows of x."""
    centred = x.double() - x.double().mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / len(x)).clamp_min(0)
    p = eig / eig.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()))


def measure(suite: str, seed: int, work: Path) -> dict:
    """The first merge's features of one preset run (stopped there)."""
    values = {**METHODS["pm-validated"][0], "seed": seed, "output_dir": str(work / f"{suite}-{seed}")}
    values["disable_tqdm"] = True
    loop = build_loop(RunConfig(*parse_config(benchmark.SUITES[suite], benchmark._overrides(values))))
    taken: dict = {}
    make_context = loop.merge_context

    def merge_context(t, task, *args):
        context, line = make_context(t, task, *args)
        align, later = alignment_of(loop), loop.stream.tasks[1:]

        def features() -> torch.Tensor:
            return torch.cat([align.features_of(loop.model, k.eval)[0].cpu() for k in later])

        taken.update(feature_move(line(), loop, task), later={a: line().at(a, features) for a in ALPHAS})
        raise FirstMerge

    loop.merge_context = merge_context
    try:
        loop.run()
    except FirstMerge:
        pass
    return {
        "seed": seed,
        "move": taken["move"],
        "later_rank": {str(a): effective_rank(taken["later"][a]) for a in ALPHAS},
    }


def table(rows: dict[str, list[dict]]) -> str:
    """The Markdown table of `features.json`."""
    out = [
        "| suite | move of the first task's held-out features at α_1 = 1 (seeds 0 / 1 / 2) | effective rank of "
        "the later tasks' eval features at α_1 = 0 / 0.5 / 1 (per seed) |",
        "|---|---|---|",
    ]
    for suite, runs in rows.items():
        moves = " / ".join(f"{r['move']:.2f}" for r in runs)
        ranks = "; ".join(" / ".join(f"{r['later_rank'][str(a)]:.1f}" for a in ALPHAS) for r in runs)
        out.append(f"| {suite} | {moves} | {ranks} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "first-merge")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for suite in args.suites:
            benchmark.ensure_assets(suite, args.threads)
            rows[suite] = [measure(suite, seed, Path(work)) for seed in range(args.seeds)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "features.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
