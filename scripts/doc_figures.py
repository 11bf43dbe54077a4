"""Every measured figure of README.md and docs/*.md, written from the committed results (runs nothing, trains nothing).

A figure is a block of a page between two markers, `<!-- figure:<name> -->` and `<!-- /figure:<name> -->` (the suite
tables keep `<!-- results:<suite> -->`, the memory table `<!-- memory-table -->`); this script owns what is between
them. Sources: `results/<suite>/table.md`, `summary.json` and `runs/*/seed*.json` (scripts/benchmark.py),
`results/cost/cost.json` and `cost.md` (`benchmark.py cost`), the alpha tables (scripts/alpha_table.py), the
memory formula (scripts/memory_table.py) and its measurement (`results/memory/measured.json`,
scripts/memory_measured.py).

    python scripts/doc_figures.py            # rewrite every block from the committed results
    python scripts/doc_figures.py --check    # exit 1 and name each block that differs (tests/test_doc_figures.py),
                                             # and each results/<suite>/table.md or summary.json that is not what
                                             # `benchmark.py <suite> --summary-only` writes from the runs

What each block holds is written by a function of scripts/figure_sources/ (`suites`, `llm`, `cost`; their helpers
over results/ in `common`); this script keeps the blocks, the registry `FIGURES` and the check.

Workflow after a benchmark: rerun it (results/<suite>/ changes), run this script, read the prose next to the blocks
that changed, commit.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------- blocks
class Figure(NamedTuple):
    page: str  # relative to the repository root
    name: str  # the marker's name: "figure:<x>", "results:<suite>" or "memory-table"
    write: Callable[[], str]  # the block's text (without the markers)
    sources: str  # what it is written from, for the report and --list

    @property
    def markers(self) -> tuple[str, str]:
        return f"<!-- {self.name} -->", f"<!-- /{self.name} -->"


def read_block(text: str, start: str, end: str) -> str | None:
    """The text between the markers (stripped), None when the page lacks them."""
    if start not in text or end not in text.split(start, 1)[1]:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def replace_block(text: str, start: str, end: str, block: str) -> str:
    """`text` with the block between `start` and `end` replaced by `block` (markers kept, one per line)."""
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block.strip(chr(10))}\n{end}{tail}"


def write_block(page: Path, start: str, end: str, block: str) -> bool:
    """Replace the block in the file `page` (atomically); False when the page lacks the markers."""
    text = page.read_text(encoding="utf-8")
    if read_block(text, start, end) is None:
        return False
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(replace_block(text, start, end, block), encoding="utf-8")
    os.replace(tmp, page)
    return True


# ------------------------------------------------------------------------------------------------ the figures
from figure_sources.common import ACCURACY_SUITES, RESULTS, runs  # noqa: E402, F401 (runs: tests/test_doc_figures.py)
from figure_sources.cost import cost_pipeline, cost_state, cost_table, memory, memory_measured  # noqa: E402
from figure_sources.llm import llm_bar, llm_eps_sweep, llm_facts, llm_length_test  # noqa: E402
from figure_sources.suites import (  # noqa: E402
    alpha,
    bf16_state,
    first_merge,
    first_merge_features,
    fisher_traces,
    readme_acc,
    readme_alpha,
    suite_facts,
    suite_table,
    validation_bias,
    validation_chord,
    validation_truth,
)
from first_merge_table import CHECKS as CHECK_SUITES  # noqa: E402 (the first-merge limit's check suites)

FIGURES = [
    Figure("README.md", "figure:readme-acc", readme_acc, "results/<suite>/summary.json"),
    Figure("README.md", "figure:readme-alpha", readme_alpha, "results/<suite>/summary.json"),
    *(Figure("docs/results.md", f"results:{s}", lambda s=s: suite_table(s), f"results/{s}/table.md")
      for s in ACCURACY_SUITES),
    *(Figure("docs/results.md", f"figure:{s}-facts", lambda s=s: suite_facts(s),
             f"results/{s}/summary.json, results/{s}/runs") for s in ("vision-cil", "text-cil")),
    Figure("docs/results.md", "figure:alpha-acc", alpha(0), "results/<suite>/runs (scripts/alpha_table.py)"),
    Figure("docs/results.md", "figure:alpha-loss", alpha(1), "results/<suite>/runs (scripts/alpha_table.py)"),
    Figure("docs/results.md", "figure:first-merge-acc", first_merge(0),
           "results/<suite>/runs/pm-validated-{half,first-1} (scripts/first_merge_table.py)"),
    Figure("docs/results.md", "figure:first-merge-second", first_merge(1),
           "results/<suite>/runs/pm-validated-{half,first-1} (scripts/first_merge_table.py)"),
    Figure("docs/results.md", "figure:first-merge-bound", first_merge(2),
           "results/<suite>/runs/{pm-validated-half,oracle-alpha-proto{,-first-0.5}} (scripts/first_merge_table.py)"),
    Figure("docs/results.md", "figure:first-merge-move", first_merge(3),
           "results/<suite>/runs/pm-validated{,-half,-first-1} (scripts/first_merge_table.py)"),
    Figure("docs/results.md", "figure:first-merge-checks", first_merge(4),
           "results/{vision-cil-fashion,text-cil-10-order1}/runs (scripts/first_merge_table.py)"),
    Figure("docs/results.md", "figure:first-merge-features", first_merge_features,
           "results/first-merge/features.json (scripts/first_merge_features.py)"),
    Figure("docs/results.md", "figure:llm-instruct-facts", llm_facts, "results/llm-instruct/runs"),
    Figure("docs/results.md", "figure:llm-eps-sweep", llm_eps_sweep, "results/llm-instruct{,-long}/runs"),
    Figure("docs/results.md", "figure:llm-bar", llm_bar, "results/llm-instruct-long/runs"),
    Figure("docs/results.md", "figure:validation-truth", validation_truth, "results/*/validation_truth"),
    Figure("docs/results.md", "figure:validation-bias", validation_bias, "results/<suite>/runs/pm-validated*"),
    Figure("docs/results.md", "figure:validation-chord", validation_chord, "results/<suite>/runs/pm-validated*"),
    Figure("docs/results.md", "figure:llm-length-test", llm_length_test, "results/llm-instruct-long/length_test"),
    Figure("docs/results.md", "figure:cost", cost_table, "results/cost/cost.json, results/cost/cost.md"),
    Figure("docs/results.md", "figure:cost-pipeline", cost_pipeline, "results/cost/cost.json"),
    Figure("docs/results.md", "figure:cost-state", cost_state, "results/cost/cost.json"),
    Figure("docs/results.md", "figure:cost-full", lambda: cost_table("cost-full"),
           "results/cost-full/cost.json, results/cost-full/cost.md"),
    Figure("docs/results.md", "figure:cost-full-pipeline", lambda: cost_pipeline("cost-full"),
           "results/cost-full/cost.json"),
    Figure("docs/method.md", "figure:fisher-traces", fisher_traces, "results/<suite>/runs (fisher_traces)"),
    Figure("docs/distributed.md", "memory-table", memory, "scripts/memory_table.py (model shapes)"),
    Figure("docs/distributed.md", "figure:memory-measured", memory_measured, "results/memory/measured.json"),
    Figure("docs/distributed.md", "figure:bf16-state", bf16_state, "results/{vision,text}-cil/runs"),
]  # fmt: skip


def check_sources(suites: tuple[str, ...] = ACCURACY_SUITES, results: Path = RESULTS) -> list[str]:
    """One line per suite whose committed `table.md` or `summary.json` is not what `benchmark.py <suite>
    --summary-only` writes from its committed runs (the plot is not redrawn)."""
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("benchmark", SCRIPTS / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.plot_method_curves = lambda *args, **kwargs: None
    problems = []
    for suite in suites:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "runs").symlink_to(results / suite / "runs", target_is_directory=True)
            benchmark.summarize_accuracy(Path(tmp), recommended=benchmark.RECOMMENDED.get(suite))
            for name in ("table.md", "summary.json"):
                written, committed = Path(tmp) / name, results / suite / name
                if written.read_text(encoding="utf-8") != committed.read_text(encoding="utf-8"):
                    problems.append(f"results/{suite}/{name} differs from its runs: run "
                                    f"`python scripts/benchmark.py {suite} --summary-only`")  # fmt: skip
    return problems


def check(root: Path = ROOT, figures: list[Figure] = FIGURES) -> list[str]:
    """One line per block of the pages under `root` that is missing or differs from what its source writes."""
    problems, pages = [], {}
    for fig in figures:
        text = pages.setdefault(fig.page, (root / fig.page).read_text(encoding="utf-8"))
        found = read_block(text, *fig.markers)
        if found is None:
            problems.append(f"{fig.page}: no {fig.markers[0]} ... {fig.markers[1]} block")
        elif found.strip() != fig.write().strip():
            problems.append(f"{fig.page}: {fig.name} differs from {fig.sources}")
    return problems


def write(root: Path = ROOT, figures: list[Figure] = FIGURES) -> list[str]:
    """Rewrite every block; the names of those that changed."""
    changed = []
    for fig in figures:
        page = root / fig.page
        before = read_block(page.read_text(encoding="utf-8"), *fig.markers)
        if before is None:
            raise SystemExit(f"{fig.page}: no {fig.markers[0]} ... {fig.markers[1]} block")
        block = fig.write()
        if before.strip() != block.strip():
            write_block(page, *fig.markers, block)
            changed.append(f"{fig.page}: {fig.name}")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a block differs")
    parser.add_argument("--list", action="store_true", help="list the blocks and their sources")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{f.page}\t{f.name}\t{f.sources}" for f in FIGURES))
        return 0
    if args.check:
        problems = check_sources() + check_sources(CHECK_SUITES) + check()
        print("\n".join(problems) or f"the suites' tables match their runs; all {len(FIGURES)} figure blocks match "
              "their sources")  # fmt: skip
        return 1 if problems else 0
    changed = write()
    print("\n".join(f"rewritten: {c}" for c in changed) or "no block changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
