"""The cost suite's and the memory figures (results/cost, results/memory, scripts/memory_table.py)."""

from __future__ import annotations

import statistics

from figure_sources.common import RESULTS, _json, para, span

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


def cost_table(folder: str = "cost") -> str:
    """results/<folder>/cost.json's figures with cost.md's bars and verdicts (`cost`: the quick suite, `cost-full`:
    the full one)."""
    cost = _json(RESULTS / folder / "cost.json")
    bars = {}
    for line in (RESULTS / folder / "cost.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in COST_LABELS:
            bars[cells[0]] = (cells[2].replace(">=", "≥").replace("<=", "≤"), cells[3])
    m, wall = cost["machine"], round(cost["raw"]["wall_s"])
    lines = [f"`results/{folder}/cost.md` ({m['date'][:10]}, {m['cpu_count']} CPU cores, torch {m['torch']}, "
             f"{cost['raw']['model']}{', quick' if cost['raw'].get('quick') else ', full'}; {wall // 60} min "
             f"{wall % 60} s):", "", "| figure | value | bar |", "|---|---|---|"]  # fmt: skip
    labels = COST_LABELS if cost.get("figures_version", 1) >= 2 else COST_LABELS_V1
    for key, (label, digits) in labels.items():
        bar, result = bars.get(key, ("-", "-"))
        value = f"{cost[key]:.{digits}f}"
        if key.startswith("preset_"):
            value = f"**{value}**"
        bar = "—" if bar == "-" else bar + (": **fails**" if result == "FAIL" else "")
        lines.append(f"| {label} | {value} | {bar} |")
    ratios = cost["raw"]["step_rate"]["ratios"]
    fm, text = cost["raw"]["fisher_merge"], ""
    if cost.get("figures_version", 1) >= 2:  # per-epoch rounds (version 1: over an extrapolated task)
        text = (
            f" The Fisher and merge figures: the median of {len(fm['seconds']['epoch'])} rounds, each after one "
            f"training epoch of {fm['samples']} samples; single rounds of the merge: "
            f"{span(fm['ratios_per_round']['merge'], 1, 4)}."
        )
    lines += ["", para(f"Single rounds of the step-rate ratio: {span(ratios, 1, 2)} ({len(ratios)} rounds).{text}")]
    return "\n".join(lines)


def cost_pipeline(folder: str = "cost") -> str:
    """The whole-pipeline comparison of results/<folder>/cost.json (scripts/bench_pipeline.py), by part, and the
    Fisher sample caps."""
    p = _json(RESULTS / folder / "cost.json")["raw"]["pipeline"]
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
