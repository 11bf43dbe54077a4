"""The LLM track's figures (results/llm-instruct, results/llm-instruct-long)."""

from __future__ import annotations

from figure_sources.common import RESULTS, para, pct, runs


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


def llm_length_test() -> str:
    """The length test of the LLM track (scripts/llm_length_test.py, its committed JSON per seed)."""
    import llm_figures

    return llm_figures.length_table(llm_figures.load_length_tests(RESULTS))
