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

Workflow after a benchmark: rerun it (results/<suite>/ changes), run this script, read the prose next to the blocks
that changed, commit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pm_hf.config.presets import RECOMMENDED_PRESET  # noqa: E402

ACCURACY_SUITES = ("vision-cil", "text-cil", "vision-cil-10", "text-cil-10", "llm-instruct", "llm-instruct-long")
README_SUITES = ("vision-cil", "text-cil", "vision-cil-10", "text-cil-10")
PRESET, ORACLE = RECOMMENDED_PRESET, "oracle-alpha-proto"
BOUNDS = ("joint", "oracle-alpha", "oracle-alpha-proto")  # upper bounds, not methods


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


# -------------------------------------------------------------------------------------------------- sources
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


# ------------------------------------------------------------------------------------------------ the figures
def suite_table(suite: str) -> str:
    """What `benchmark.py <suite> --summary-only` wrote: results/<suite>/table.md, as it is."""
    return (RESULTS / suite / "table.md").read_text(encoding="utf-8").strip()


README_METHODS = {
    "seq-merge": "`seq-merge` (sequential LoRA, α = 1)",
    "coma": "`coma` (α = 0.5)",
    "task-arithmetic": "`task-arithmetic`",
    "pm": "`pm` (the paper's method)",
    "pm-proto": "`pm-proto` (closed-form α + the prototype head)",
    "pm-validated": "**`pm-validated`** (recommended preset)",
    "coma-proto": "`coma-proto` (α = 0.5 + the same head alignment)",
    "sqrt-t-proto": "`sqrt-t-proto` (α = 1/√t + the same head alignment)",
    "slow-proto": "`slow-proto` (SLCA's slow backbone learner + the same head alignment)",
    "oracle-alpha-proto": "`oracle-alpha-proto` (α picked on the eval sets: a bound)",
    "joint": "`joint` (all tasks at once: upper bound)",
}


def readme_acc() -> str:
    """The README's ACC table: mean ± sample std from each suite's summary.json, seeds counted."""
    sums = {s: summary(s) for s in README_SUITES}
    counts = [len(row["seeds"]) for s in sums.values() for m, row in s.items() if m in README_METHODS]
    usual = statistics.mode(counts)
    tasks = {s: len(next(iter(sums[s].values()))["curve"]) for s in README_SUITES}
    lines = [para(f"Accuracy over all seen classes after the last task (ACC, %), mean ± sample std over {usual} seeds "
                  "(another count is given in the cell), from `results/<suite>/summary.json`; \"—\": not run on that "
                  "suite."), "",
             "| method | " + " | ".join(f"{s} ({tasks[s]} tasks)" for s in README_SUITES) + " |",
             "|---|" + "---|" * len(README_SUITES)]  # fmt: skip
    for m, label in README_METHODS.items():
        cells = []
        for s in README_SUITES:
            row = sums[s].get(m)
            n = len(row["seeds"]) if row else 0
            cells.append("—" if not row else mean_std(row) + ("" if n == usual else f" ({n} seed{'s' * (n > 1)})"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_alpha() -> str:
    """The README's one-line verdict on the preset's alpha, from the summaries (no number typed by hand); suites that
    lack one of the methods compared are left out of that comparison."""
    sums = {s: summary(s) for s in README_SUITES}
    acc = {s: {m: 100 * r["acc"]["mean"] for m, r in sums[s].items()} for s in README_SUITES}
    long = [s for s in README_SUITES if s.endswith("-10") and {PRESET, "coma-proto", "sqrt-t-proto"} <= set(acc[s])]
    if not long:
        return para(f"The preset `{PRESET}` has no committed run on the 10-task sequences yet.")
    margin = min(acc[s][PRESET] - max(acc[s]["coma-proto"], acc[s]["sqrt-t-proto"]) for s in long)
    with_oracle = [s for s in README_SUITES if {PRESET, ORACLE} <= set(acc[s])]
    gaps = ", ".join(f"{s} {acc[s][PRESET] - acc[s][ORACLE]:+.1f}" for s in with_oracle)
    constants = (f"beats α = 0.5 and α = 1/√t by {margin:.1f} points or more" if margin > 0 else
                 f"falls up to {-margin:.1f} points behind α = 0.5 or α = 1/√t")  # fmt: skip
    return para(f"With the same head alignment, the preset's α (`{PRESET}`) {constants} on the 10-task sequences "
                f"({', '.join(long)}); against the oracle bound (α picked on the eval sets) it stands at {gaps} "
                "points.")  # fmt: skip


def suite_facts(suite: str) -> str:
    """Derived figures of one class-incremental suite that the prose discusses, from summary.json and the runs."""
    sm, rs = summary(suite), runs(suite)
    plain = {m: r for m, r in sm.items() if not aligned(r) and m not in BOUNDS}
    best = max(plain, key=lambda m: plain[m]["acc"]["mean"])
    rows = [("figure", "value"), ("---", "---")]
    if PRESET in sm:
        rows.append((f"ACC of the preset `{PRESET}`", mean_std(sm[PRESET])))
    rows.append(("best ACC without head alignment (bounds left out)", f"`{best}` {mean_std(sm[best])}"))
    if "joint" in sm:
        rows.append(("`joint` (all tasks at once: upper bound)", mean_std(sm["joint"])))
    if "pm" in sm and "oracle-alpha" in sm:
        gap = 100 * (sm["oracle-alpha"]["acc"]["mean"] - sm["pm"]["acc"]["mean"])
        rows.append(("`oracle-alpha` − `pm` (ACC points)", f"{gap:+.1f}"))
        for m in ("pm", "oracle-alpha"):
            rows.append((f"α per task of `{m}` (mean)", ", ".join(f"{a:.2f}" for a in sm[m]["alphas"])))
    rows.append(("ACC without head alignment, range of method means (%)",
                 span([r["acc"]["mean"] for r in plain.values()])))  # fmt: skip
    rows.append(("within-task ACC without head alignment, range of method means (%)",
                 span([r["til_acc"]["mean"] for r in plain.values() if r.get("til_acc")])))  # fmt: skip
    pre = [run["pre_merge_acc"] for m in plain for run in rs.get(m, []) if run.get("pre_merge_acc")]
    for t in range(1, max((len(p) for p in pre), default=0)):
        rows.append((f"task {t + 1}: accuracy over all seen classes before its merge, runs without alignment (%)",
                     span([p[t] for p in pre if len(p) > t])))  # fmt: skip
    shares = [r["align_over_train"] for r in sm.values() if aligned(r)]
    if shares:
        rows.append(("head align / train, range over the methods with alignment", span(shares) + "%"))
    seeds = sorted({len(r["seeds"]) for r in sm.values()})
    fewer = sorted(m for m, r in sm.items() if len(r["seeds"]) < seeds[-1])
    rows.append(("seeds per method", f"{seeds[-1]}" + (f"; fewer: {', '.join(fewer)}" if fewer else "")))
    return "\n".join(f"| {a} | {b} |" for a, b in rows)


def bf16_state() -> str:
    """Largest change of α from storing S and G in bf16 (`pm-bf16-state` against `pm`, same seed)."""
    lines = ["| suite | seeds compared | largest change of α | same accuracy matrix |", "|---|---|---|---|"]
    for suite in ("vision-cil", "text-cil"):
        rs = runs(suite)
        pm = {r["seed"]: r for r in rs.get("pm", [])}
        pairs = [(pm[r["seed"]], r) for r in rs.get("pm-bf16-state", []) if r["seed"] in pm]
        if not pairs:
            continue
        diff = max(abs(a - b) for p, q in pairs for a, b in zip(p["alphas"], q["alphas"], strict=True))
        same = all(p["accuracy_matrix"] == q["accuracy_matrix"] for p, q in pairs)
        lines.append(f"| {suite} | {len(pairs)} | {diff:.1e} | {'yes' if same else 'no'} |")
    return "\n".join(lines)


def llm_facts() -> str:
    """Seed 0 of each llm-instruct method, and the best exact match of any task in any run."""
    rs = runs("llm-instruct")
    lines = ["| seed 0 | ROUGE-L final | ROUGE-L forgetting | eval-loss forgetting (nats) | task 1 ROUGE-L, after "
             "tasks 1..T | last task's eval loss | α of the last task | task seconds | Fisher seconds (/ train) | "
             "peak RSS |", "|---" * 10 + "|"]  # fmt: skip
    for m, method_runs in rs.items():
        run = next((r for r in method_runs if r["seed"] == 0), None)
        if run is None:
            continue
        s, rouge, loss = run["score_summaries"], run["score_matrices"]["rougeL"], run["score_matrices"]["eval_loss"]
        train = sum(t["train"] for t in run["timings"])
        fisher = sum(t["fisher"] for t in run["timings"])
        lines.append(f"| {m} | {pct(s['rougeL']['final'])} | {pct(s['rougeL']['forgetting'])} | "
                     f"{s['eval_loss']['forgetting']:.3f} | {', '.join(f'{row[0]:.2f}' for row in rouge)} | "
                     f"{loss[-1][-1]:.2f} | {run['alphas'][-1]:.2f} | "
                     f"{sum(sum(t.values()) for t in run['timings']):.0f} | {fisher:.0f} ({fisher / train:.2f}) | "
                     f"{run['peak_rss_mb'] / 1000:.2f} GB |")  # fmt: skip
    em = [(v, m, r["seed"]) for m, mr in rs.items() for r in mr for row in r["score_matrices"]["exact_match"]
          for v in row if v is not None]  # fmt: skip
    best = max(em)
    lines += [
        "",
        para(
            f"Best exact match of any task after any task, over every run: {pct(best[0])}% (`{best[1]}`, "
            f"seed {best[2]}); seeds: " + ", ".join(f"`{m}` {len(mr)}" for m, mr in rs.items()) + "."
        ),
    ]
    return "\n".join(lines)


def llm_eps_sweep() -> str:
    """The eps sweep of both LLM suites (scripts/llm_figures.py)."""
    import llm_figures

    return llm_figures.eps_sweep(runs)


def llm_bar() -> str:
    """Item 3's table and bar on llm-instruct-long (scripts/llm_figures.py)."""
    import llm_figures

    return llm_figures.llm_table(llm_figures.CANDIDATE, runs=runs)


def validation_truth() -> str:
    """validated-alpha's estimate against the eval scores it stands for (scripts/validation_truth.py)."""
    import validation_truth

    return validation_truth.table(validation_truth.SUITES, RESULTS)


def llm_length_test() -> str:
    """The length test of the LLM track (scripts/llm_length_test.py, its committed JSON per seed)."""
    import llm_figures

    return llm_figures.length_table(llm_figures.load_length_tests(RESULTS))


def fisher_traces() -> str:
    """Largest / smallest task Fisher trace within a run (tasks that logged one), range over the runs of `pm` and
    `pm-secant-proto` (where they log `fisher_traces`), per class-incremental suite."""
    lines = ["| suite | method | runs | largest / smallest trace within a run |", "|---|---|---|---|"]
    for suite in README_SUITES:
        for m, method_runs in runs(suite).items():
            ratios = []
            for run in method_runs:
                traces = [t for t in run.get("fisher_traces") or [] if t]
                if len(traces) > 1:
                    ratios.append(max(traces) / min(traces))
            if ratios and m in ("pm", "pm-secant-proto"):
                lines.append(f"| {suite} | {m} | {len(ratios)} | {span(ratios, 1)}× |")
    return "\n".join(lines)


# results/cost/cost.json written before the figures were measured on the work they describe (no "figures_version"):
# merge_over_train was over an extrapolated task
COST_LABELS_V1 = {
    "pm_over_plain_step_rate": ("`PMTrainer` (eps 0.5) / plain `Trainer` optimizer steps per second", 3),
    "fisher_per_sample_over_epoch": ("per-sample Fisher pass / one training epoch", 2),
    "fisher_batch_over_epoch": ("batch-mode Fisher pass / one training epoch", 2),
    "merge_over_train": ("alpha + merge / task training time", 4),
    "state_growth_10_over_2": ("saved continual state after task 10 / after task 2 (10-task tiny-BERT run)", 3),
    "rss_growth_10_over_2": ("resident memory after task 10 / after task 2", 3),
    "preset_over_seq_merge_task_time": (
        "**whole pipeline**: total task seconds of the demo's preset / `seq-merge`, same epochs", 2),
}  # fmt: skip
COST_LABELS = {
    "pm_over_plain_step_rate": ("`PMTrainer` (eps 0.5) / plain `Trainer` optimizer steps per second", 3),
    "fisher_per_sample_over_epoch": ("per-sample Fisher pass / one training epoch", 2),
    "fisher_batch_over_epoch": ("batch-mode Fisher pass / one training epoch", 2),
    "merge_over_train": ("task vector + alpha + merge / the training of the task merged", 4),
    "state_growth_10_over_2": ("whole checkpoint folder (with the per-task log) after task 10 / after task 2 "
                               "(10-task tiny-BERT run)", 3),
    "state_without_log_growth_10_over_2": ("the same without the per-task log (S, G, weights, callbacks' state)", 3),
    "log_bytes_per_task": ("bytes the per-task log (results rows) adds to the checkpoint per task", 0),
    "rss_growth_10_over_2": ("resident memory after task 10 / after task 2", 3),
    "preset_over_seq_merge_task_time": (
        "**whole pipeline**: total task seconds of the demo's preset / `seq-merge`, same epochs", 2),
}  # fmt: skip


def cost_table() -> str:
    """results/cost/cost.json's figures with cost.md's bars and verdicts."""
    cost = _json(RESULTS / "cost" / "cost.json")
    bars = {}
    for line in (RESULTS / "cost" / "cost.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in COST_LABELS:
            bars[cells[0]] = (cells[2].replace(">=", "≥").replace("<=", "≤"), cells[3])
    m, wall = cost["machine"], cost["raw"]["wall_s"]
    lines = [f"`results/cost/cost.md` ({m['date'][:10]}, {m['cpu_count']} CPU cores, torch {m['torch']}, "
             f"{cost['raw']['model']}{', quick' if cost['raw'].get('quick') else ''}; {wall // 60:.0f} min "
             f"{wall % 60:.0f} s):", "", "| figure | value | bar |", "|---|---|---|"]  # fmt: skip
    labels = COST_LABELS if cost.get("figures_version", 1) >= 2 else COST_LABELS_V1
    for key, (label, digits) in labels.items():
        bar, result = bars.get(key, ("-", "-"))
        value = f"{cost[key]:.{digits}f}"
        if key.startswith("preset_"):
            value = f"**{value}**"
        bar = "—" if bar == "-" else bar + (": **fails**" if result == "FAIL" else "")
        lines.append(f"| {label} | {value} | {bar} |")
    ratios = cost["raw"]["step_rate"]["ratios"]
    lines += ["", f"Single rounds of the step-rate ratio: {span(ratios, 1, 2)} ({len(ratios)} rounds)."]
    return "\n".join(lines)


def cost_pipeline() -> str:
    """The whole-pipeline comparison of results/cost/cost.json (scripts/bench_pipeline.py), by part, and the Fisher
    sample caps."""
    p = _json(RESULTS / "cost" / "cost.json")["raw"]["pipeline"]
    parts = p["seconds_by_part"]
    names = [k for k in ("train", "fisher", "head_align", "merge", "eval") if any(k in v for v in parts.values())]
    lines = ["| seconds, all tasks | " + " | ".join(names) + " | total |", "|---|" + "---|" * (len(names) + 1)]
    for method, by in parts.items():
        total = statistics.fmean(p["seconds"][method])
        lines.append(f"| {method} | " + " | ".join(f"{by.get(k, 0.0):.1f}" for k in names) + f" | {total:.1f} |")
    train = parts["preset"]["train"]
    lines += [
        "",
        f"Fisher pass / training (preset): {parts['preset']['fisher'] / train:.2f}; ratio of totals "
        f"{p['preset_over_seq_merge']:.2f} (the median of {len(p['ratios_per_round'])} rounds: "
        f"{span(p['ratios_per_round'], 1, 2)}).",
    ]
    if not p["fisher_cap_max_alpha_error"]:
        return "\n".join([*lines, "", "The preset takes no Fisher: no Fisher sample cap to study."])
    lines += ["",
              f"| Fisher sample cap (of {p['fisher_full_samples']} per task) | largest change of α | Fisher seconds "
              "| α per task |", "|---|---|---|---|",
              f"| none | 0 | {p['fisher_full_fisher_seconds']:.1f} | "
              + ", ".join(f"{a:.2f}" for a in p["alphas"]["full"]) + " |"]  # fmt: skip
    for cap, err in p["fisher_cap_max_alpha_error"].items():
        lines.append(f"| {cap} | {err:.2f} | {p['fisher_cap_fisher_seconds'][cap]:.1f} | "
                     + ", ".join(f"{a:.2f}" for a in p["alphas"][cap]) + " |")  # fmt: skip
    within = p.get("smallest_cap_within_0.01")
    lines += ["", f"Smallest cap keeping α within 0.01: {within if within is not None else 'none'}."]
    return "\n".join(lines)


def cost_state() -> str:
    """The saved state's growth from task 2 to task 10 (results/cost/cost.json, tiny-BERT run)."""
    mem = _json(RESULTS / "cost" / "cost.json")["raw"]["memory"]["after_task"]
    a, b = mem["2"], mem["10"]
    lines = ["| part of the saved state | after task 2 (bytes) | after task 10 (bytes) | growth |", "|---|---|---|---|"]
    for part in a["parts"]:
        lines.append(f"| {part} | {a['parts'][part]} | {b['parts'][part]} | {b['parts'][part] - a['parts'][part]:+d} |")
    grow = b["checkpoint_bytes"] - a["checkpoint_bytes"]
    lines.append(f"| checkpoint (total) | {a['checkpoint_bytes']} | {b['checkpoint_bytes']} | {grow:+d} "
                 f"({100 * grow / a['checkpoint_bytes']:.1f}%) |")  # fmt: skip
    per_task = (b["adapter_log_bytes"] - a["adapter_log_bytes"]) / 8
    lines += ["", f"Per-task adapter log (`adapters/task_<t>.safetensors`, outside the checkpoint): "
              f"{per_task / 1000:.1f} KB per task."]  # fmt: skip
    return "\n".join(lines)


def memory() -> str:
    import memory_table

    return memory_table.markdown(memory_table.table())


def memory_measured() -> str:
    import memory_measured

    return memory_measured.markdown(_json(RESULTS / "memory" / "measured.json"))


def alpha(which: int) -> Callable[[], str]:
    def write() -> str:
        import alpha_table

        return alpha_table.tables()[which]

    return write


FIGURES = [
    Figure("README.md", "figure:readme-acc", readme_acc, "results/<suite>/summary.json"),
    Figure("README.md", "figure:readme-alpha", readme_alpha, "results/<suite>/summary.json"),
    *(Figure("docs/results.md", f"results:{s}", lambda s=s: suite_table(s), f"results/{s}/table.md")
      for s in ACCURACY_SUITES),
    *(Figure("docs/results.md", f"figure:{s}-facts", lambda s=s: suite_facts(s),
             f"results/{s}/summary.json, results/{s}/runs") for s in ("vision-cil", "text-cil")),
    Figure("docs/results.md", "figure:alpha-acc", alpha(0), "results/<suite>/runs (scripts/alpha_table.py)"),
    Figure("docs/results.md", "figure:alpha-loss", alpha(1), "results/<suite>/runs (scripts/alpha_table.py)"),
    Figure("docs/results.md", "figure:llm-instruct-facts", llm_facts, "results/llm-instruct/runs"),
    Figure("docs/results.md", "figure:llm-eps-sweep", llm_eps_sweep, "results/llm-instruct{,-long}/runs"),
    Figure("docs/results.md", "figure:llm-bar", llm_bar, "results/llm-instruct-long/runs"),
    Figure("docs/results.md", "figure:validation-truth", validation_truth, "results/*/validation_truth"),
    Figure("docs/results.md", "figure:llm-length-test", llm_length_test, "results/llm-instruct-long/length_test"),
    Figure("docs/results.md", "figure:cost", cost_table, "results/cost/cost.json, results/cost/cost.md"),
    Figure("docs/results.md", "figure:cost-pipeline", cost_pipeline, "results/cost/cost.json"),
    Figure("docs/results.md", "figure:cost-state", cost_state, "results/cost/cost.json"),
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
        problems = check_sources() + check()
        print("\n".join(problems) or f"the suites' tables match their runs; all {len(FIGURES)} figure blocks match "
              "their sources")  # fmt: skip
        return 1 if problems else 0
    changed = write()
    print("\n".join(f"rewritten: {c}" for c in changed) or "no block changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
