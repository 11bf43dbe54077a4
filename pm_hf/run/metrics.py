"""Continual-learning metrics over an accuracy matrix, and plots of them (numpy + matplotlib only, no model).

Convention: ``R[t][j]`` is the score on task ``j`` after training task ``t`` (0-based). ``R`` is a T x T
lower-triangular matrix: entries above the diagonal (``j > t``, tasks not yet seen) are NaN, entries on and below it
must be finite. Scores are fractions in [0, 1] or any per-task score where higher is better. ``R`` may be an
``np.ndarray``, a square list of lists with NaN above the diagonal, or a ragged list whose row ``t`` has ``t + 1``
entries. With ``sizes[j]`` = number of test samples of task ``j``, ACC and AAA become sample-weighted, i.e. the
accuracy "over all seen classes" of class-incremental learning (one pooled test set per row).

    ACC  = mean_j R[T-1][j]                                   (final_accuracy, weighted_final_accuracy)
    AAA  = mean_t mean_{j<=t} R[t][j]                         (average_accuracy)
    BWT  = mean_{j<T-1} (R[T-1][j] - R[j][j])                 (backward_transfer; 0.0 for T = 1)
    F    = mean_{j<T-1} (max_{j<=t<=T-2} R[t][j] - R[T-1][j])  (forgetting, Chaudhry et al. 2018; 0.0 for T = 1)

Plots build a ``matplotlib.figure.Figure`` on an Agg canvas (no pyplot, no global backend change) and write
atomically (``pm_hf.fileio``). matplotlib is the optional extra ``pm_hf[plots]``, imported by the plots only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import require_extra
from ..fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MatrixLike = np.ndarray | Sequence[Sequence[float]]
Vector = np.ndarray | Sequence[float]
PathLike = str | os.PathLike[str]


def _as_matrix(R: MatrixLike, unscored_ok: bool = False) -> np.ndarray:
    """Validate ``R`` and return it as a float64 T x T array (NaN above the diagonal; with ``unscored_ok``, also in
    whole columns: tasks trained without an eval split)."""
    rows = list(R) if not isinstance(R, np.ndarray) and isinstance(R, Sequence) else []
    if rows and all(isinstance(r, Sequence | np.ndarray) and len(r) == i + 1 for i, r in enumerate(rows)):
        R = [list(r) + [math.nan] * (len(rows) - i - 1) for i, r in enumerate(rows)]  # ragged triangle
    try:
        M = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"R must be a numeric T x T matrix (R[t][j] = score on task j after training task t); could not convert "
            f"it ({err}). Pass equal-length rows with NaN above the diagonal, or a ragged triangle (row t: t+1 values)."
        ) from None
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(
            f"R must be a non-empty square T x T matrix (row t = after task t, column j = task j); got shape "
            f"{M.shape}. Pass one row per trained task and one column per task, NaN above the diagonal."
        )
    upper = np.triu(np.ones_like(M, dtype=bool), k=1)
    bad = np.argwhere(upper & ~np.isnan(M))
    if bad.size:
        t, j = (int(x) for x in bad[0])
        raise ValueError(
            f"R[{t}][{j}] = {float(M[t, j])} is above the diagonal (task {j} is not yet trained after task {t}); "
            f"set every R[t][j] with j > t to NaN."
        )
    unscored = np.isnan(M).all(axis=0) if unscored_ok else np.zeros(M.shape[1], dtype=bool)
    bad = np.argwhere(~upper & ~np.isfinite(M) & ~unscored[None, :])
    if bad.size:
        t, j = (int(x) for x in bad[0])
        raise ValueError(
            f"R[{t}][{j}] = {float(M[t, j])} is on/below the diagonal, where every score must be a finite number; "
            f"evaluate task {j} after training task {t} and fill it in."
        )
    return M


def _as_sizes(sizes: Vector, T: int) -> np.ndarray:
    """Validate per-task test-set sizes against a T x T matrix; return them as float64."""
    try:
        s = np.array(sizes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"sizes must be a sequence of {T} positive numbers; got {sizes!r}.") from None
    if s.shape != (T,):
        raise ValueError(
            f"sizes must have one entry per task (shape ({T},) for a {T} x {T} R); got shape {s.shape}. "
            f"Pass sizes[j] = number of test samples of task j."
        )
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"sizes must be finite and > 0 (test samples per task); got {s.tolist()}. Drop empty tasks.")
    return s


def seen_accuracy(scores: Vector, sizes: Vector) -> float:
    """The score over the pooled eval sets of several tasks: sum_j sizes[j] * scores[j] / sum_j sizes[j] (for
    accuracies, the accuracy over all seen classes). The one definition used by the loop, the oracle, these metrics
    and the benchmark runner.

    Args:
        scores: per-task scores (e.g. row t of R, tasks 0..t); None or NaN where a task has no eval split.
        sizes: eval samples per task, same length, >= 0; a task of size 0 (no eval split) is left out.

    Returns:
        The pooled score; NaN when no task has eval samples.
    """
    s = np.asarray(sizes, dtype=np.float64)
    v = np.asarray(scores, dtype=np.float64)
    if v.shape != s.shape or v.ndim != 1 or v.size == 0:
        raise ValueError(f"scores and sizes must be non-empty 1-D and of one length; got {v.shape} and {s.shape}.")
    scored = s > 0
    if not scored.any():
        return math.nan
    # correctly rounded sums (math.fsum), not a BLAS dot: the same bits on every CPU, so that a summary rebuilt from
    # committed runs on another machine equals the committed one (scripts/doc_figures.py --check)
    return math.fsum((v[scored] * s[scored]).tolist()) / math.fsum(s[scored].tolist())


def _row_mean(M: np.ndarray, t: int, s: np.ndarray | None) -> float:
    """Mean (sample-weighted when ``s`` is given) of the seen entries R[t][:t+1]."""
    row = M[t, : t + 1]
    return float(np.mean(row)) if s is None else seen_accuracy(row, s[: t + 1])


def final_accuracy(R: MatrixLike, sizes: Vector | None = None) -> float:
    """ACC: mean of the last row of ``R``.

    Args:
        R: T x T accuracy matrix (see module docstring).
        sizes: optional test samples per task; when given the mean is sample-weighted.

    Returns:
        The final accuracy as a float.
    """
    M = _as_matrix(R)
    return _row_mean(M, M.shape[0] - 1, None if sizes is None else _as_sizes(sizes, M.shape[0]))


def weighted_final_accuracy(R: MatrixLike, sizes: Vector) -> float:
    """ACC over all seen classes: sample-weighted mean of the last row (pooled accuracy on the union of test sets).

    Args:
        R: T x T accuracy matrix.
        sizes: ``sizes[j]`` = number of test samples of task ``j`` (length T, all > 0).

    Returns:
        sum_j sizes[j] * R[T-1][j] / sum_j sizes[j].
    """
    return final_accuracy(R, sizes)


def average_accuracy(R: MatrixLike, sizes: Vector | None = None) -> float:
    """AAA: mean over t of the accuracy on tasks 0..t after training task t.

    Args:
        R: T x T accuracy matrix.
        sizes: optional test samples per task; when given each row mean is sample-weighted.

    Returns:
        The average incremental accuracy as a float.
    """
    M = _as_matrix(R)
    s = None if sizes is None else _as_sizes(sizes, M.shape[0])
    return float(np.mean([_row_mean(M, t, s) for t in range(M.shape[0])]))


def backward_transfer(R: MatrixLike) -> float:
    """BWT: mean over j < T-1 of R[T-1][j] - R[j][j] (negative means forgetting).

    Args:
        R: T x T accuracy matrix.

    Returns:
        Backward transfer as a float; 0.0 when T = 1.
    """
    M = _as_matrix(R)
    T = M.shape[0]
    return 0.0 if T == 1 else float(np.mean(M[T - 1, : T - 1] - np.diag(M)[: T - 1]))


def forgetting(R: MatrixLike) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean over j < T-1 of max_{j<=t<=T-2} R[t][j] - R[T-1][j].

    Args:
        R: T x T accuracy matrix.

    Returns:
        Forgetting as a float (negative only if the last row beats every earlier score); 0.0 when T = 1.
    """
    M = _as_matrix(R)
    T = M.shape[0]
    if T == 1:
        return 0.0
    best = np.nanmax(M[: T - 1, : T - 1], axis=0)  # NaN above the diagonal: rows t >= j only
    return float(np.mean(best - M[T - 1, : T - 1]))


def summarize(R: MatrixLike, sizes: Vector | None = None) -> dict[str, float]:
    """All four metrics at once.

    Args:
        R: T x T accuracy matrix.
        sizes: optional test samples per task; weights ACC and AAA (BWT and forgetting stay per-task means).

    Returns:
        ``{"acc", "aaa", "bwt", "forgetting"}`` mapped to plain Python floats.
    """
    M = _as_matrix(R)
    return {
        "acc": final_accuracy(M, sizes),
        "aaa": average_accuracy(M, sizes),
        "bwt": backward_transfer(M),
        "forgetting": forgetting(M),
    }


def can_plot() -> bool:
    """Whether matplotlib (the extra ``pm_hf[plots]``) is installed."""
    from importlib.util import find_spec

    return find_spec("matplotlib") is not None


def _figure(**kwargs) -> Figure:
    require_extra("plots", "plotting", "matplotlib")
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, path: PathLike) -> str:
    """Write ``fig`` to ``path`` as a PNG, atomically; return the path as a string."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    atomic_write(path, lambda tmp: FigureCanvasAgg(fig).print_png(tmp))
    return os.fspath(path)


def plot_accuracy_matrix(
    R: MatrixLike,
    path: PathLike,
    task_names: Sequence[str] | None = None,
    title: str | None = None,
    unscored_ok: bool = False,
) -> str:
    """Heatmap of ``R`` with each seen cell annotated in percent (raw values if any score lies outside [0, 1]).

    Args:
        R: T x T accuracy matrix.
        path: output PNG path.
        task_names: optional T labels (default "task 0", ...); rows read "after <name>".
        title: optional figure title.
        unscored_ok: allow columns of NaN (tasks trained without an eval split); they are left blank.

    Returns:
        ``path`` as a string.
    """
    M = _as_matrix(R, unscored_ok)
    T = M.shape[0]
    names = [f"task {j}" for j in range(T)] if task_names is None else [str(n) for n in task_names]
    if len(names) != T:
        raise ValueError(f"task_names must have {T} entries (one per task of R); got {len(names)}: {names!r}.")
    seen = M[~np.isnan(M)]
    percent = bool(np.all((seen >= 0) & (seen <= 1)))
    lo, hi = (0.0, 1.0) if percent or not seen.size else (float(seen.min()), float(seen.max()))
    fig = _figure(figsize=(1.2 + 0.8 * T, 1.0 + 0.7 * T), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1.0)
    for t in range(T):
        for j in (j for j in range(t + 1) if np.isfinite(M[t, j])):
            frac = (M[t, j] - lo) / (hi - lo) if hi > lo else 0.5
            text = f"{100 * M[t, j]:.1f}" if percent else f"{M[t, j]:.3g}"
            ax.text(j, t, text, ha="center", va="center", fontsize=8, color="black" if frac > 0.6 else "white")
    ax.set_xticks(range(T), names, rotation=45, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task t")
    fig.colorbar(im, ax=ax, label="score (cells in %)" if percent else "score")
    ax.set_title(title or "")
    return _save(fig, path)


def plot_accuracy_curve(
    seen_acc: Vector, alphas: Vector, path: PathLike, title: str | None = None, alphas_raw: Vector | None = None
) -> str:
    """Seen-class accuracy per task (left axis) and the merge coefficient alpha per task (right axis).

    Args:
        seen_acc: accuracy on all seen classes after each task (length T).
        alphas: alpha used for each task (length T; NaN where none, e.g. task 0), drawn as markers.
        path: output PNG path.
        title: optional figure title.
        alphas_raw: optional unclamped alphas (length T), drawn dashed.

    Returns:
        ``path`` as a string.
    """
    acc = np.asarray(seen_acc, dtype=np.float64)
    series = {"alphas": np.asarray(alphas, dtype=np.float64)}
    if alphas_raw is not None:
        series["alphas_raw"] = np.asarray(alphas_raw, dtype=np.float64)
    for name, arr in series.items():
        if arr.shape != acc.shape or acc.ndim != 1 or acc.size == 0:
            raise ValueError(
                f"seen_acc and {name} must be non-empty 1-D arrays with one value per task; got shapes {acc.shape} "
                f"and {arr.shape}. Use NaN for tasks without an alpha."
            )
    x = np.arange(1, acc.size + 1)
    fig = _figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    lines = ax.plot(x, acc, "-o", color="tab:blue", label="seen-class accuracy")
    ax.set_xlabel("task")
    ax.set_ylabel("seen-class accuracy")
    ax.set_xticks(x)
    ax2 = ax.twinx()
    lines += ax2.plot(x, series["alphas"], "s", color="tab:orange", label="alpha")
    if alphas_raw is not None:
        lines += ax2.plot(x, series["alphas_raw"], "--x", color="tab:red", label="alpha (raw)")
    ax2.set_ylabel("alpha")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    ax.set_title(title or "")
    return _save(fig, path)


def plot_method_curves(
    curves: Mapping[str, Vector], path: PathLike, title: str | None = None, ylabel: str = "seen-class accuracy"
) -> str:
    """One line per method of a per-task metric (e.g. seen-class accuracy after each task); a method with a single
    value (e.g. joint training) is a dotted horizontal line.

    Args:
        curves: method name -> values per task (lengths may differ).
        path: output PNG path.
        title: optional figure title.
        ylabel: label of the y axis.

    Returns:
        ``path`` as a string.
    """
    if not curves or any(len(v) == 0 for v in curves.values()):
        raise ValueError(f"curves must map at least one method name to a non-empty list of values; got {curves!r}.")
    fig = _figure(figsize=(8.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 1:
            ax.axhline(values[0], ls=":", color="gray", label=f"{name} (final)")
        else:
            ax.plot(np.arange(1, values.size + 1), values, "-o", ms=3, label=str(name))
    ax.set_xlabel("after task")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=7, ncol=2 if len(curves) > 8 else 1)
    ax.grid(alpha=0.3)
    ax.set_title(title or "")
    return _save(fig, path)
