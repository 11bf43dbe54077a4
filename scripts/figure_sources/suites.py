"""The accuracy suites' figures: the README's tables, each suite's facts, the α tables, the first merge (at 0.5
against 1, and the preset's choice by the features' move), the Fisher traces, the validation truth and the bf16
state."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

from figure_sources.common import (
    BOUNDS,
    ORACLE,
    PRESET,
    README_SUITES,
    RESULTS,
    aligned,
    mean_std,
    para,
    runs,
    span,
    summary,
)


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
    above = [f"{s} {', '.join(ahead)}" for s in README_SUITES if (ahead := _above(acc[s]))]
    rivals = (f" Methods that end above it without reading the eval sets: {'; '.join(above)} points." if above else
              " No method that does not read the eval sets ends above it.")  # fmt: skip
    return para(f"With the same head alignment, the preset's α (`{PRESET}`) {constants} on the 10-task sequences "
                f"({', '.join(long)}); against the oracle bound (α picked on the eval sets) it stands at {gaps} "
                f"points.{rivals}")  # fmt: skip


def _above(acc: dict[str, float]) -> list[str]:
    """The methods (bounds left out) whose mean ACC is above the preset's, best first, with their margin."""
    ahead = sorted(((a, m) for m, a in acc.items() if m not in BOUNDS and a > acc[PRESET]), reverse=True)
    return [f"`{m}` {a - acc[PRESET]:+.1f}" for a, m in ahead]


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


def validation_truth() -> str:
    """validated-alpha's estimate against the eval scores it stands for (scripts/validation_truth.py)."""
    import validation_truth

    return validation_truth.table(validation_truth.SUITES, RESULTS)


def validation_bias() -> str:
    """The estimate's parts against the accuracy the run measured, with the stored and the calibrated old-class
    widths (scripts/validation_bias.py)."""
    import validation_bias

    return validation_bias.table(["pm-validated-exact", "pm-validated-calibrated"], RESULTS)


def validation_chord() -> str:
    """The interpolated features' estimates against the exact rule's, at and between the knots
    (scripts/validation_chord.py)."""
    import validation_chord

    return validation_chord.table(RESULTS)


def first_merge(which: int) -> Callable[[], str]:
    """The first merge at 0.5 against 1 (scripts/first_merge_table.py): 0, ACC per seed; 1, the second merge's
    estimates under each; 2, the rule at 0.5 against the greedy oracle from either first merge; 3, the preset's
    first move, the alpha it took and its ACC beside the two fixed rules'; 4, the same on the check suites."""

    def write() -> str:
        import first_merge_table

        return first_merge_table.tables(RESULTS)[which]

    return write


def first_merge_features() -> str:
    """The preset's first move beside the later tasks' effective rank (scripts/first_merge_features.py's JSON)."""
    import first_merge_features

    rows = json.loads((RESULTS / "first-merge" / "features.json").read_text())
    return first_merge_features.table(rows)


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


def alpha(which: int) -> Callable[[], str]:
    def write() -> str:
        import alpha_table

        return alpha_table.tables()[which]

    return write
