"""What a run reports: results.json (score matrices, their summaries, alpha per task, timings, config), the plots
next to it, and the printed end-of-run summary.

Score convention: R[t][j] = score of task j after task t; `accuracy_matrix` is the primary score's matrix
('accuracy' over all seen classes for classifiers, `primary_metric` for causal LMs) and `score_matrices` holds every
score. Summaries follow `pm_hf.run.metrics` (ACC, AAA sample-weighted over the tasks' eval sets; BWT, forgetting).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_text
from ..method.strategies import MergePlan
from . import metrics
from .evaluation import LOWER_IS_BETTER

logger = logging.getLogger(__name__)

# per-task log keys copied to results.json lists (results key -> log key)
PER_TASK = {
    "alphas": "alpha",
    "alphas_raw": "alpha_raw",
    "pre_merge_acc": "pre_merge_acc",
    "pre_merge_til_acc": "pre_merge_til_acc",
    "train_losses": "train_losses",
    "optimizer_steps": "optimizer_steps",
    "oracle_scores": "oracle_scores",
    "alpha_terms": "terms",
    "delta_norms": "delta_norm",
    "branch_counts": "branch_counts",
    "timings": "timings",
    "fisher_traces": "fisher_trace",
    "calibrations": "calibration",
    "loss_increases": "loss_increase",
    "branch_losses": "branch_losses",
}


def _as_nan(m: list[list]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)


def score_matrices(log: list[dict]) -> dict[str, list[list]]:
    """R[t][j] per score name from the per-task log (None above the diagonal, and in the column of a task trained
    without an eval split)."""
    T = len(log)
    names = list(dict.fromkeys(n for e in log for n in e["scores"]))  # a row before any scored task holds fewer
    value = lambda e, n, j: e["scores"][n][j] if n in e["scores"] else None  # noqa: E731
    return {n: [[value(e, n, j) if j <= t else None for j in range(T)] for t, e in enumerate(log)] for n in names}


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def summarize(R: list[list], sizes: list[int], weighted: bool = True) -> dict:
    """`metrics.summarize` of R (sample-weighted ACC and AAA unless `weighted` is False), over the tasks that have
    scores: a task trained without an eval split (size 0, a column of None) is left out of every summary; None
    where no task has a score."""
    M, T = _as_nan(R), len(R)
    if all(n > 0 for n in sizes):
        return metrics.summarize(M, sizes=sizes if weighted else None)
    old = [j for j in range(T - 1) if sizes[j] > 0]
    weights = sizes if weighted else [int(n > 0) for n in sizes]
    rows = [metrics.seen_accuracy(M[t, : t + 1], weights[: t + 1]) for t in range(T)]
    rows = [r for r in rows if math.isfinite(r)]
    if not rows:
        return {"acc": None, "aaa": None, "bwt": None, "forgetting": None}
    return {
        "acc": _finite_or_none(metrics.seen_accuracy(M[T - 1], weights)),
        "aaa": float(np.mean(rows)),
        "bwt": float(np.mean([M[T - 1, j] - M[j, j] for j in old])) if old else 0.0,
        "forgetting": float(np.mean([M[j : T - 1, j].max() - M[T - 1, j] for j in old])) if old else 0.0,
    }


def score_summary(name: str, R: list[list], sizes: list[int]) -> dict:
    """final / aaa / bwt / forgetting of one score matrix. Higher is better, except losses (`LOWER_IS_BETTER`): their
    matrix is negated for the summaries, so the conventions of accuracy hold: bwt < 0 and forgetting > 0 mean
    forgetting (for a loss: it went up); `final` and `aaa` are the losses themselves."""
    sign = -1.0 if name in LOWER_IS_BETTER else 1.0
    out = summarize([[None if v is None else sign * v for v in row] for row in R], sizes)
    signed = lambda v: None if v is None else sign * v  # noqa: E731
    return {"final": signed(out["acc"]), "aaa": signed(out["aaa"]), "bwt": out["bwt"], "forgetting": out["forgetting"]}


def task_entry(task, scores: dict, pre: float, plan: MergePlan, delta_norm: float, branches, seconds) -> dict:
    """Task t's log entry (one element of results.json's per-task lists)."""
    choice, terms = plan.choice, plan.terms
    return {
        "task": task.name,
        "scores": scores,
        "pre_merge_acc": pre,
        "alpha": choice.alpha,
        "alpha_raw": choice.raw,
        "alpha_fallback": choice.fallback,
        "alpha_per_key": {k: c.alpha for k, c in plan.choices.items()} if plan.per_key else None,
        "terms": None
        if terms is None
        else {
            "fisher_delta_sq": terms.fisher_delta_sq,
            "g_delta": terms.g_delta,
            "denominator": terms.denominator,
        },
        "oracle_scores": plan.oracle_scores or None,
        "delta_norm": delta_norm,
        "branch_counts": {str(b): n for b, n in sorted(branches.items())},
        "timings": dict(seconds),
    }


def results_dict(log: list[dict], eval_sizes: list[int], primary: str, config: dict, output_dir: str) -> dict:
    """results.json of a run whose per-task log is `log` (one entry per completed task)."""
    T = len(log)
    matrices = score_matrices(log)
    R = matrices.get(primary, [])
    sizes = list(eval_sizes[:T])
    out = {
        "tasks": [e["task"] for e in log],
        "primary_metric": primary,
        "accuracy_matrix": R,
        **(summarize(R, sizes) if T else {}),
        "score_matrices": matrices,
        "score_summaries": {n: score_summary(n, m, sizes) for n, m in matrices.items()},
    }
    if "til_accuracy" in matrices:
        out["til_accuracy_matrix"] = matrices["til_accuracy"]
        out["til_acc"] = summarize(matrices["til_accuracy"], sizes, weighted=False)["acc"]
    out.update({key: [e.get(name) for e in log] for key, name in PER_TASK.items()})
    out["warnings"] = [warning for e in log for warning in e.get("warnings", [])]  # tasks that did not learn
    out["unscored_tasks"] = [e["task"] for e, n in zip(log, sizes) if n == 0]  # trained without an eval split
    out.update({"peak_rss_mb": _peak_rss_mb(), "eval_sizes": sizes, "config": config, "output_dir": output_dir})
    return out


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB: `resource` where there is one (POSIX), else psutil's peak working
    set (Windows), else None."""
    try:
        import resource
    except ImportError:
        try:
            import psutil
        except ImportError:
            return None
        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)  # Windows only
        return None if peak is None else peak / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def write_outputs(out_dir: Path, results: dict) -> None:
    """results.json and the plots: the primary score's matrix, every other LM score's, and the seen-score curve."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, default=float))
    if not metrics.can_plot():
        logger.warning("No plots in %s: matplotlib is not installed (pip install 'pm_hf[plots]').", out_dir)
        return
    R = _as_nan(results["accuracy_matrix"])
    metrics.plot_accuracy_matrix(R, out_dir / "accuracy_matrix.png", title="R[t][j]", unscored_ok=True)
    for name, matrix in results["score_matrices"].items():
        if name not in ("accuracy", "til_accuracy", results["primary_metric"]):
            metrics.plot_accuracy_matrix(
                _as_nan(matrix), out_dir / f"score_matrix_{name}.png", title=f"{name}: R[t][j]", unscored_ok=True
            )
    sizes = results["eval_sizes"]
    seen = [metrics.seen_accuracy(R[t, : t + 1], sizes[: t + 1]) for t in range(len(R))]
    metrics.plot_accuracy_curve(
        seen, results["alphas"], out_dir / "accuracy_curve.png", alphas_raw=results["alphas_raw"]
    )


# ------------------------------------------------------------------------------------------ printed summary
def _is_percent(values: Sequence[float]) -> bool:
    finite = [v for v in values if _finite(v)]
    return bool(finite) and all(0.0 <= v <= 1.0 for v in finite)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any, percent: bool, signed: bool = False) -> str:
    if not _finite(v):
        return "-"
    spec = ("+" if signed else "") + (".2f" if percent else ".4f")
    return format(v * 100 if percent else v, spec)


def _fmt_g(v: Any, sign: str = "") -> str:
    return format(v, sign + ".4g") if _finite(v) else "-"


def _fmt_alpha(a: Any) -> str:
    if isinstance(a, Mapping):  # alpha_granularity="module": one alpha per merged module
        vals = [v for v in a.values() if _finite(v)]
        if not vals:
            return "-"
        return f"{len(vals)} modules, mean {sum(vals) / len(vals):.4f} [{min(vals):.4f}, {max(vals):.4f}]"
    return f"{a:.4f}" if _finite(a) else "-"


def format_results(results: Mapping[str, Any]) -> str:
    """The end-of-run summary: accuracy matrix (rows "after task t"), ACC, AAA, BWT, forgetting, alpha per task.

    Args:
        results: the dict returned by `run_continual`: `tasks` (names), `accuracy_matrix` (R[t][j] = accuracy on
            task j after training task t; NaN/None above the diagonal), `acc`, `aaa`, `bwt`, `forgetting`,
            `alphas` (clamped), `alphas_raw`, `output_dir`. Missing keys are skipped.

    Returns:
        A multi-line table. Scores in [0, 1] are shown in percent.
    """
    R = [[v if _finite(v) else None for v in row] for row in results.get("accuracy_matrix") or []]
    tasks = list(results.get("tasks") or [])
    tasks += [f"task {j + 1}" for j in range(len(tasks), len(R))]
    percent = _is_percent([v for row in R for v in row])
    unit = " (%)" if percent else ""
    score = results.get("primary_metric") or "accuracy"
    lines = [*_matrix_lines(R, tasks, score, percent), ""]
    metrics = [
        ("ACC", "acc", f"{score} on all tasks after the last one", False),
        ("AAA", "aaa", f"mean over t of the {score} on tasks 1..t", False),
        ("BWT", "bwt", "backward transfer, negative = forgetting", True),
        ("Forgetting", "forgetting", "mean drop from each task's best score", False),
    ]
    for name, key, what, signed in metrics:
        if key in results:
            lines.append(f"{name + unit:<16}{_fmt(results[key], percent, signed):>8}   {what}")
    for name, summary in (results.get("score_summaries") or {}).items():
        if name not in ("accuracy", score):
            final, bwt, forgetting = (
                _fmt_g(summary["final"]),
                _fmt_g(summary["bwt"], "+"),
                _fmt_g(summary["forgetting"]),
            )
            lines.append(f"{name:<16}final {final}  BWT {bwt}  forgetting {forgetting}")
    alphas, raw = list(results.get("alphas") or []), list(results.get("alphas_raw") or [])
    if alphas or raw:
        lines += ["", "alpha per task (merge coefficient: clamped, raw)"]
        for t in range(max(len(alphas), len(raw))):
            name = tasks[t] if t < len(tasks) else f"task {t + 1}"
            clamped = _fmt_alpha(alphas[t]) if t < len(alphas) else "-"
            unclamped = _fmt_alpha(raw[t]) if t < len(raw) else "-"
            lines.append(f"  {t + 1:>2}  {str(name):<14}  {clamped:>8}  raw {unclamped}")
    if results.get("unscored_tasks"):
        lines += ["", "Trained and merged without an eval split (not scored): " + ", ".join(results["unscored_tasks"])]
    if results.get("output_dir"):
        lines += ["", f"Results written to {results['output_dir']}"]
    return "\n".join(lines)


def _matrix_lines(R: list[list], tasks: list[str], score: str, percent: bool) -> list[str]:
    """The score matrix as a table: one row "after task t" per trained task, one column per task."""
    title = "Accuracy matrix" if score == "accuracy" else f"Score matrix ({score})"
    lines = [f"{title}{' (%)' if percent else ''}: R[t][j] = {score} on task j after training task t"]
    T = len(R)
    if T:
        width = max(7, min(14, max(len(str(n)) for n in tasks[:T])))
        label = len(f"after task {T}")
        lines.append(" " * label + "".join(f"  {str(n)[:width]:>{width}}" for n in tasks[:T]))
        for t, row in enumerate(R):
            cells = "".join(f"  {_fmt(row[j] if j < len(row) else None, percent):>{width}}" for j in range(T))
            lines.append(f"{f'after task {t + 1}':<{label}}{cells}")
    return lines


def format_evaluation(evaluation: Mapping[str, Any], run_dir: str) -> str:
    """The `pm-hf evaluate` summary: the re-evaluated last row of the accuracy matrix and ACC."""
    row = list(evaluation.get("last_row") or [])
    tasks = list(evaluation.get("tasks") or [])
    tasks += [f"task {j + 1}" for j in range(len(tasks), len(row))]
    percent = _is_percent(row + [evaluation.get("acc")])
    unit = " (%)" if percent else ""
    lines = [f"Re-evaluated {run_dir}: accuracy on each task after the last one{unit}"]
    lines += [f"  {j + 1:>2}  {str(tasks[j]):<14}  {_fmt(v, percent):>8}" for j, v in enumerate(row)]
    lines.append(f"ACC{unit:<13}{_fmt(evaluation.get('acc'), percent):>8}")
    return "\n".join(lines)


def format_export(info: Mapping[str, Any], output: str) -> str:
    """The `pm-hf export` / `pm-hf merge` summary: what was written, alpha per task and, for an SVD export, the
    relative reconstruction error per module and the score before and after."""
    lines = [f"Wrote {output} (mode {info.get('mode', 'adapter')}, base model {info.get('base_model')})"]
    if info.get("alphas"):
        lines.append("alpha per task: " + ", ".join(_fmt_alpha(a) for a in info["alphas"]))
    errors = list((info.get("relative_error") or {}).values())
    if errors:
        mean, worst = sum(errors) / len(errors), max(errors)
        lines.append(f"rank {info['rank']}: relative reconstruction error per module mean {mean:.4f}, max {worst:.4f}")
        before, after = info["score_before"], info["score_after"]
        lines.append(f"score over the trained tasks: {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    return "\n".join(lines)
