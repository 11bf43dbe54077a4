"""Every measured figure of README.md and docs/*.md is the block scripts/doc_figures.py writes from the committed
results (results/<suite>/, results/cost/, the memory formula): a block that differs from its source fails here.
After a benchmark, `python scripts/doc_figures.py` rewrites the blocks."""

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("doc_figures", ROOT / "scripts" / "doc_figures.py")
doc_figures = importlib.util.module_from_spec(spec)
sys.modules.setdefault("doc_figures", doc_figures)
spec.loader.exec_module(doc_figures)

PAGES = sorted({fig.page for fig in doc_figures.FIGURES})


@pytest.fixture(scope="module")
def written() -> dict[str, str]:
    """What the script writes for every block, computed once (the memory table builds model shapes on meta)."""
    return {fig.name: fig.write() for fig in doc_figures.FIGURES}


def _figures(written):
    """The registry with the blocks' texts precomputed."""
    return [fig._replace(write=lambda name=fig.name: written[name]) for fig in doc_figures.FIGURES]


def test_every_block_matches_its_source(written):
    problems = doc_figures.check(ROOT, _figures(written))
    assert not problems, "run `python scripts/doc_figures.py` and commit:\n" + "\n".join(problems)


def test_suite_tables_match_their_runs():
    """The suite tables' own source: results/<suite>/table.md and summary.json from results/<suite>/runs (the four
    accuracy suites and the first-merge limit's check suites)."""
    problems = doc_figures.check_sources() + doc_figures.check_sources(doc_figures.CHECK_SUITES)
    assert not problems, "\n".join(problems)


def test_check_reports_a_suite_table_edited_by_hand(tmp_path):
    shutil.copytree(ROOT / "results" / "text-cil-10", tmp_path / "text-cil-10")
    table = tmp_path / "text-cil-10" / "table.md"
    text = table.read_text(encoding="utf-8")
    acc = re.search(r"\| (\d+)\.(\d) ± ", text)  # the first ACC of the table, one tenth up
    table.write_text(text.replace(acc.group(0), f"| {float(acc.group(1) + '.' + acc.group(2)) + 0.1:.1f} ± ", 1))
    assert table.read_text(encoding="utf-8") != text
    assert doc_figures.check_sources(("text-cil-10",), tmp_path) == [
        "results/text-cil-10/table.md differs from its runs: run "
        "`python scripts/benchmark.py text-cil-10 --summary-only`"
    ]


def test_every_marker_on_the_pages_is_written_by_the_script():
    names = {fig.name for fig in doc_figures.FIGURES}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        found = set(re.findall(r"<!-- ((?:figure|results):[\w.-]+|memory-table) -->", page.read_text(encoding="utf-8")))
        assert found <= names, f"{page.name}: blocks no script writes: {sorted(found - names)}"


def _copy(tmp_path: Path) -> Path:
    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    return tmp_path


def test_check_reports_a_changed_number(tmp_path, written):
    root, figures = _copy(tmp_path), _figures(written)
    page = root / "docs" / "results.md"
    text = page.read_text(encoding="utf-8")
    block = doc_figures.read_block(text, "<!-- figure:cost -->", "<!-- /figure:cost -->")
    number = re.search(r"\| (\d+)\.(\d+) \|", block)  # the first value of the cost table, one last digit up
    digits = len(number.group(2))
    changed = f"{float(number.group(1) + '.' + number.group(2)) + 10**-digits:.{digits}f}"
    tampered = block.replace(number.group(0), f"| {changed} |", 1)
    assert tampered != block
    page.write_text(text.replace(block, tampered), encoding="utf-8")
    assert doc_figures.check(root, figures) == [
        "docs/results.md: figure:cost differs from results/cost/cost.json, results/cost/cost.md"
    ]
    assert doc_figures.write(root, figures) == ["docs/results.md: figure:cost"]  # the default mode repairs it
    assert doc_figures.check(root, figures) == []
    assert page.read_text(encoding="utf-8") == text


def test_check_reports_a_changed_suite_table_and_a_lost_marker(tmp_path, written):
    root, figures = _copy(tmp_path), _figures(written)
    page = root / "README.md"
    text = page.read_text(encoding="utf-8")
    block = doc_figures.read_block(text, "<!-- figure:readme-acc -->", "<!-- /figure:readme-acc -->")
    page.write_text(text.replace(block, block.replace(" ± ", " +- ", 1)), encoding="utf-8")
    results = root / "docs" / "results.md"
    results.write_text(results.read_text(encoding="utf-8").replace("<!-- /results:text-cil -->", ""), encoding="utf-8")
    assert doc_figures.check(root, figures) == [
        "README.md: figure:readme-acc differs from results/<suite>/summary.json",
        "docs/results.md: no <!-- results:text-cil --> ... <!-- /results:text-cil --> block",
    ]


def test_replace_block_keeps_the_rest_of_the_page():
    text = "a\n<!-- figure:x -->\nold\n<!-- /figure:x -->\nb\n"
    new = doc_figures.replace_block(text, "<!-- figure:x -->", "<!-- /figure:x -->", "new 1\nnew 2")
    assert new == "a\n<!-- figure:x -->\nnew 1\nnew 2\n<!-- /figure:x -->\nb\n"
    assert doc_figures.read_block(new, "<!-- figure:x -->", "<!-- /figure:x -->") == "new 1\nnew 2"
    assert (
        doc_figures.read_block("a <!-- /figure:x --> <!-- figure:x -->", "<!-- figure:x -->", "<!-- /figure:x -->")
        is None
    )


def _llm_run(method, seed, alphas, norms, rouge, loss_forgetting, steps=100):
    diag = [[rouge[t] if s == t else 0.0 for s in range(len(rouge))] for t in range(len(rouge))]
    summaries = {"rougeL": {"final": 0.1, "forgetting": 0.05}, "eval_loss": {"forgetting": loss_forgetting}}
    return {"method": method, "seed": seed, "alphas": alphas, "delta_norms": norms, "optimizer_steps": [steps] * 3,
            "score_matrices": {"rougeL": diag}, "score_summaries": summaries}  # fmt: skip


def test_llm_eps_sweep_by_hand():
    """scripts/llm_figures.py: Σ α_t ‖τ_t‖ over tasks 2..T, the diagonal's mean over tasks 2..T, and the per-seed
    pairs against merge-only, on runs whose figures are worked out by hand."""
    import llm_figures

    base = _llm_run("merge-only", 0, [1.0, 0.5, 0.25], [9.0, 4.0, 8.0], [0.9, 0.2, 0.4], 0.2)
    assert llm_figures.merge_length(base) == 0.5 * 4 + 0.25 * 8  # task 1's 9.0 is not counted
    assert llm_figures.new_task_score(base) == pytest.approx(0.3)  # (0.2 + 0.4) / 2, task 1's 0.9 not counted
    longer = _llm_run("pm", 0, [1.0, 0.5, 0.25], [9.0, 6.0, 8.0], [0.9, 0.2, 0.4], 0.1)  # more moved, less forgot
    other_seed = _llm_run("pm", 1, [1.0, 0.5, 0.25], [9.0, 6.0, 8.0], [0.9, 0.2, 0.4], 0.3)  # no eps-0 pair
    runs = {"merge-only": [base], "pm": [longer, other_seed]}
    assert llm_figures.paired(runs, "pm") == "1 / 0 of 1"
    table = llm_figures.eps_sweep(lambda suite: runs if suite == "llm-instruct-long" else {})
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    # eps, seeds, mean ‖τ_t‖ over tasks 2..T, Σ α_t ‖τ_t‖: seed 1, which merge-only lacks, is left out of the rows
    assert [(r[1], r[2], r[7], r[8]) for r in rows] == [("0.0", "1", "6.00", "4.00"), ("0.5", "1", "7.00", "5.00")]
    short = _llm_run("pm", 2, [1.0, 0.5, 0.25], [9.0, 6.0, 8.0], [0.9, 0.2, 0.4], 0.3, steps=20)
    with pytest.raises(ValueError, match="optimizer_steps"):  # a 20-step run among the 100-step suite's runs
        llm_figures.eps_sweep(lambda suite: {"pm": [short]} if suite == "llm-instruct-long" else {})


def test_llm_bar_by_hand():
    """Item 3's bar: the candidate's means over 3 seeds against merge-only's and average's; each shortfall named."""
    import llm_figures

    def three(method, final, forgetting, loss_forgetting):
        runs = [_llm_run(method, s, [1.0, 0.5], [1.0, 1.0], [0.1, 0.1], loss_forgetting) for s in range(3)]
        for r in runs:
            r["score_summaries"]["rougeL"] = {"final": final, "forgetting": forgetting}
        return runs

    runs = {"c": three("c", 0.13, 0.06, 0.20), "merge-only": three("merge-only", 0.12, 0.07, 0.24),
            "average": three("average", 0.13, 0.06, 0.21)}  # fmt: skip
    assert llm_figures.bar(runs, "c") == []  # ties with average count as met
    runs["average"] = three("average", 0.14, 0.05, 0.19)
    assert llm_figures.bar(runs, "c") == [
        "ROUGE-L final 13.0 < average's 14.0",
        "ROUGE-L forgetting 6.0 > average's 5.0",
        "eval-loss forgetting 0.200 > average's 0.190",
    ]
    runs["c"] = runs["c"][:2]
    assert llm_figures.bar(runs, "c")[0] == "c: 2 seeds"


def test_the_named_llm_recommendation_meets_its_bar():
    """summary.json names a recommended LLM method (scripts/benchmark.py RECOMMENDED) only where the committed runs
    meet item 3's bar: if a rerun or a new seed breaks it, this fails."""
    import llm_figures

    named = json.loads((ROOT / "results" / "llm-instruct-long" / "summary.json").read_text())["recommended"]
    assert named == llm_figures.CANDIDATE
    assert llm_figures.bar(doc_figures.runs("llm-instruct-long"), named) == []
