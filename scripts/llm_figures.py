"""The LLM track's eps sweep, from the committed run JSONs of `llm-instruct` (20 optimizer steps per task) and
`llm-instruct-long` (100): what the perturbation's strength does to forgetting, to the new task, and to the length of
the task vectors that the merges add; and item 3's table with its bar (issue 24). Runs nothing; `scripts/doc_figures.py`
writes both into docs/results.md (`figure:llm-eps-sweep`, `figure:llm-bar`).

    python scripts/llm_figures.py [METHOD]    # print both (METHOD: the candidate, default merge-only-fisher-mean)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
# the runner's methods of the sweep and their eps (scripts/benchmark.py METHODS: merge-only is eps 0, pm is 0.5)
SWEEP = {"merge-only": 0.0, "pm-eps-0.1": 0.1, "pm-eps-0.25": 0.25, "pm": 0.5}
# optimizer steps per task of each suite's config (160 samples / batch 8, 1 epoch; 400 / 8, 2 epochs); runs that
# record `optimizer_steps` are checked against it
SUITES = {"llm-instruct": 20, "llm-instruct-long": 100}


def load_runs(suite: str, results: Path = RESULTS) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in sorted((results / suite / "runs").glob("*/seed*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        out.setdefault(run["method"], []).append(run)
    return out


def merge_length(run: dict) -> float:
    """sum over tasks 2..T of alpha_t * ||tau_t||: how much task vector the merges after the first add."""
    return sum(a * n for a, n in zip(run["alphas"][1:], run["delta_norms"][1:], strict=True))


def new_task_score(run: dict, metric: str = "rougeL") -> float:
    """The mean over tasks 2..T of each task's own score right after its merge (the matrix's diagonal)."""
    m = run["score_matrices"][metric]
    return statistics.mean(m[t][t] for t in range(1, len(m)))


def run_facts(run: dict) -> dict[str, float]:
    s = run["score_summaries"]
    return {
        "final": s["rougeL"]["final"],
        "forgetting": s["rougeL"]["forgetting"],
        "loss_forgetting": s["eval_loss"]["forgetting"],
        "new_task": new_task_score(run),
        "tau": statistics.mean(run["delta_norms"][1:]),
        "moved": merge_length(run),
    }


def _steps(suite: str, method_runs: list[dict]) -> int:
    steps = SUITES[suite]
    for run in method_runs:
        recorded = set(run.get("optimizer_steps") or [steps])
        if recorded != {steps}:
            raise ValueError(f"{suite} {run['method']} seed {run['seed']}: optimizer_steps {recorded}, not {steps}")
    return steps


def paired(suite_runs: dict[str, list[dict]], method: str) -> str:
    """Seeds where `method` and merge-only (eps 0) both ran: in how many did each figure rise with the eps."""
    base = {r["seed"]: run_facts(r) for r in suite_runs.get("merge-only", [])}
    pairs = [(base[r["seed"]], run_facts(r)) for r in suite_runs.get(method, []) if r["seed"] in base]
    if not pairs:
        return "—"
    rose = {k: sum(p[k] > b[k] for b, p in pairs) for k in ("moved", "loss_forgetting")}
    return f"{rose['moved']} / {rose['loss_forgetting']} of {len(pairs)}"


def eps_sweep(runs: Callable[[str], dict[str, list[dict]]] = load_runs) -> str:
    """One row per suite and eps, means over the seeds that every eps of that suite ran."""
    lines = [
        "| steps per task | eps | seeds | ROUGE-L final | ROUGE-L forgetting | eval-loss forgetting (nats) | "
        "new task's ROUGE-L after its merge (tasks 2-4) | mean ‖τ_t‖ (tasks 2-4) | Σ α_t ‖τ_t‖ (tasks 2-4) | "
        "seeds where Σ α‖τ‖ / eval-loss forgetting exceed eps 0's |",
        "|---" * 10 + "|",
    ]
    for suite in SUITES:
        suite_runs = runs(suite)
        ran = [{r["seed"] for r in suite_runs[m]} for m in SWEEP if suite_runs.get(m)]
        common = set.intersection(*ran) if ran else set()  # like with like: the seeds every eps of the suite ran
        for method, eps in SWEEP.items():
            method_runs = [r for r in suite_runs.get(method, []) if r["seed"] in common]
            if not method_runs:
                continue
            facts = [run_facts(r) for r in method_runs]
            mean = {k: statistics.mean(f[k] for f in facts) for k in facts[0]}
            lines.append(
                f"| {_steps(suite, method_runs)} | {eps} | {len(facts)} | {100 * mean['final']:.1f} | "
                f"{100 * mean['forgetting']:.1f} | {mean['loss_forgetting']:.3f} | {100 * mean['new_task']:.1f} | "
                f"{mean['tau']:.2f} | {mean['moved']:.2f} | {'—' if eps == 0 else paired(suite_runs, method)} |"
            )
    return "\n".join(lines)


# item 3's bar: the recommended settings forget no more than these, at a final score no worse than theirs (3 seeds)
BAR_AGAINST = ("merge-only", "average")
TABLE = ("pm", "merge-only", "average", "seq", "osf", "olora")  # the table's other rows
CANDIDATE = "merge-only-fisher-mean"  # the LLM recommended settings' candidate (docs/results.md says why)


def bar(suite_runs: dict[str, list[dict]], recommended: str) -> list[str]:
    """What fails item 3's bar, on the means over each method's seeds (ROUGE-L final and forgetting, eval-loss
    forgetting); [] when it is met. Fewer than 3 seeds of a method is a failure too."""
    means = {
        m: {
            k: statistics.mean(run_facts(r)[k] for r in suite_runs[m])
            for k in ("final", "forgetting", "loss_forgetting")
        }
        for m in (recommended, *BAR_AGAINST)
        if suite_runs.get(m)
    }
    problems = [
        f"{m}: {len(suite_runs.get(m, []))} seeds"
        for m in (recommended, *BAR_AGAINST)
        if len(suite_runs.get(m, [])) < 3
    ]
    if recommended not in means:
        return problems
    mine = means[recommended]
    for m in BAR_AGAINST:
        if m not in means:
            continue
        if mine["final"] < means[m]["final"]:
            problems.append(f"ROUGE-L final {100 * mine['final']:.1f} < {m}'s {100 * means[m]['final']:.1f}")
        if mine["forgetting"] > means[m]["forgetting"]:
            problems.append(
                f"ROUGE-L forgetting {100 * mine['forgetting']:.1f} > {m}'s {100 * means[m]['forgetting']:.1f}"
            )
        if mine["loss_forgetting"] > means[m]["loss_forgetting"]:
            problems.append(
                f"eval-loss forgetting {mine['loss_forgetting']:.3f} > {m}'s {means[m]['loss_forgetting']:.3f}"
            )
    return problems


def llm_table(recommended: str, suite: str = "llm-instruct-long", runs=load_runs) -> str:
    """Item 3's table: the candidate for the recommended settings and the rows it is compared with, means over seeds,
    and the bar; the candidate is called recommended only where it meets the bar."""
    suite_runs = runs(suite)
    lines = [
        "| method | seeds | ROUGE-L final | ROUGE-L forgetting | eval-loss forgetting (nats) | exact match final |",
        "|---|---|---|---|---|---|",
    ]
    problems = bar(suite_runs, recommended)
    label = {recommended: f"{recommended} ({'the candidate' if problems else 'recommended'})"}
    for m in (recommended, *TABLE):
        rs = suite_runs.get(m)
        if not rs:
            lines.append(f"| {label.get(m, m)} | — | — | — | — | — |")
            continue
        f = {k: statistics.mean(run_facts(r)[k] for r in rs) for k in ("final", "forgetting", "loss_forgetting")}
        em = statistics.mean(r["score_summaries"]["exact_match"]["final"] for r in rs)
        lines.append(
            f"| {label.get(m, m)} | {', '.join(str(r['seed']) for r in rs)} | {100 * f['final']:.1f} | "
            f"{100 * f['forgetting']:.1f} | {f['loss_forgetting']:.3f} | {100 * em:.1f} |"
        )
    verdict = "met" if not problems else "not met: " + "; ".join(problems)
    return "\n".join([*lines, "", f"Item 3's bar (against {' and '.join(BAR_AGAINST)}, means over seeds): {verdict}."])


# scripts/llm_length_test.py's variants, in the table's order: the runs as they ran, then each at the other's lengths
LENGTH_VARIANTS = ("pm", "merge-only", "pm at merge-only's length", "merge-only at pm's length")


def load_length_tests(results: Path = RESULTS) -> list[dict]:
    paths = sorted((results / "llm-instruct-long" / "length_test").glob("seed*.json"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def length_shares(test: dict) -> tuple[float, float]:
    """The share of pm's extra eval-loss forgetting over merge-only (F_pm - F_mo) that the lengths account for, both
    ways: removed by giving pm's vectors merge-only's lengths, (F_pm - F_pm,rescaled) / (F_pm - F_mo), and added by
    giving merge-only's vectors pm's lengths, (F_mo,rescaled - F_mo) / (F_pm - F_mo). 1 when the length is the
    whole cause, 0 when it is none."""
    f = {name: v["summary"]["forgetting"] for name, v in test["variants"].items()}
    gap = f["pm"] - f["merge-only"]
    return (f["pm"] - f["pm at merge-only's length"]) / gap, (f["merge-only at pm's length"] - f["merge-only"]) / gap


def length_table(tests: list[dict]) -> str:
    """The length test's table, means over the seeds tested (scripts/llm_length_test.py)."""
    if not tests:
        return "(no length test committed)"
    lines = [
        "| merged model | seeds | Σ α_t ‖τ_t‖ (tasks 2-4) | eval-loss forgetting (nats) | task 1's eval loss after "
        "task 2's merge, rise (nats) | new task's eval loss after its merge (tasks 2-4) |",
        "|---|---|---|---|---|---|",
    ]
    seeds = ", ".join(str(t["seed"]) for t in tests)
    for name in LENGTH_VARIANTS:
        vs = [t["variants"][name] for t in tests]

        def mean(f, vs=vs):
            return statistics.mean(f(v) for v in vs)

        lines.append(
            f"| {name} | {seeds} | {mean(lambda v: v['merge_length']):.2f} | "
            f"{mean(lambda v: v['summary']['forgetting']):.3f} | "
            f"{mean(lambda v: v['eval_loss'][1][0] - v['eval_loss'][0][0]):.3f} | "
            f"{mean(lambda v: statistics.mean(v['eval_loss'][t][t] for t in range(1, len(v['eval_loss'])))):.3f} |"
        )
    shares = [length_shares(t) for t in tests]
    removed = ", ".join(f"{100 * r:.0f}%" for r, _ in shares)
    added = ", ".join(f"{100 * a:.0f}%" for _, a in shares)
    worst = max(max(t["rebuild_max_abs_diff"].values()) for t in tests)
    lines += [
        "",
        f"The share of pm's extra eval-loss forgetting (over merge-only's) that the lengths account for, per seed "
        f"({seeds}): removed from pm by merge-only's lengths {removed}; added to merge-only by pm's lengths {added}. "
        f"The rebuilt `pm` and `merge-only` matrices equal the runs' own within {worst:.0e} nats. cos(τ_t of pm, "
        f"τ_t of merge-only) per task, mean over the seeds: "
        + ", ".join(f"{statistics.mean(t['cosines'][k] for t in tests):.2f}" for k in range(len(tests[0]["cosines"])))
        + " (task 1 trains from the same θ_0 with the same seed in both runs; later tasks from different merged "
        "models).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(eps_sweep())
    print()
    print(length_table(load_length_tests()))
    print()
    sys.exit(print(llm_table(sys.argv[1] if len(sys.argv) > 1 else CANDIDATE)))
