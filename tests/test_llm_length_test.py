"""scripts/llm_length_test.py's pure parts, worked out by hand: a task vector from an adapter record, its length, the
rescaling factors, the merged delta and the loss matrix's shape (the script itself rebuilds the runs' merged models,
and checks its rebuild against each run's own eval-loss matrix)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("llm_length_test", ROOT / "scripts" / "llm_length_test.py")
lt = importlib.util.module_from_spec(spec)
sys.modules.setdefault("llm_length_test", lt)
spec.loader.exec_module(lt)


def test_dense_vector_is_s_b_a_in_the_base_layout():
    from pm_hf.hub.export import TaskRecord

    A, B = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[1.0], [3.0]])  # rank 1: B A = [[1, 2, 0], [3, 6, 0]]
    rec = TaskRecord({"w": 0.5}, {"w": 2.0}, {"w": A}, {"w": B}, False)
    assert torch.equal(lt.dense_vector(rec)["w"], torch.tensor([[2.0, 4.0, 0.0], [6.0, 12.0, 0.0]]))  # s = 2, not alpha
    fan = TaskRecord({"w": 0.5}, {"w": 2.0}, {"w": A}, {"w": B}, True)  # Conv1D layout: transposed
    assert lt.dense_vector(fan)["w"].shape == (3, 2)
    # ||tau||_F = 2 * sqrt(1 + 4 + 9 + 36) = 2 sqrt(50)
    assert lt.vector_norm(lt.dense_vector(rec)) == pytest.approx(2 * math.sqrt(50))


def test_scales_give_the_target_lengths_and_the_merge_sums_alpha_c_tau():
    taus = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 2.0])}]  # lengths 5 and 2
    scales = lt.length_scales([lt.vector_norm(t) for t in taus], [10.0, 1.0])
    assert scales == [2.0, 0.5]
    assert [lt.vector_norm({"w": c * t["w"]}) for c, t in zip(scales, taus)] == [10.0, 1.0]
    assert lt.cosine(taus[0], taus[1]) == pytest.approx(8 / 10)  # (3*0 + 4*2) / (5 * 2)
    assert lt.cosine(taus[0], {"w": -2 * taus[0]["w"]}) == pytest.approx(-1.0)
    alphas = [{"w": 1.0}, {"w": 0.25}]
    assert torch.equal(lt.merged_delta(taus, alphas, scales, 0)["w"], torch.tensor([6.0, 8.0]))  # task 1 only
    # 1 * 2 * [3, 4] + 0.25 * 0.5 * [0, 2] = [6, 8.25]
    assert torch.equal(lt.merged_delta(taus, alphas, scales, 1)["w"], torch.tensor([6.0, 8.25]))


def test_loss_matrix_applies_each_merge_before_scoring_the_seen_tasks():
    state, calls = {}, []

    def apply(t):
        state["t"] = t

    def losses(j):
        calls.append((state["t"], j))
        return 10 * state["t"] + j

    R = lt.loss_matrix(apply, losses, 3)
    assert R == [[0, None, None], [10, 11, None], [20, 21, 22]]
    assert calls == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]  # only seen tasks, after their merge


def test_committed_length_tests_rebuild_the_committed_runs():
    """Each committed length test (results/llm-instruct-long/length_test/seed*.json) rebuilt the very runs committed
    under runs/: its as-run variants' eval-loss matrices and lengths are those runs' own, its rescaled variants have
    the other run's lengths, and every summary is the one the run's own code computes from its matrix."""
    import json

    from pm_hf.run.results import score_summary

    tests = sorted((ROOT / "results" / "llm-instruct-long" / "length_test").glob("seed*.json"))
    assert tests, "no committed length test"
    for path in tests:
        test = json.loads(path.read_text())
        folder = ROOT / "results" / "llm-instruct-long" / "runs"
        runs = {m: json.loads((folder / m / f"seed{test['seed']}.json").read_text()) for m in ("pm", "merge-only")}
        for name, run in runs.items():
            mine, own = test["variants"][name]["eval_loss"], run["score_matrices"]["eval_loss"]
            assert [[None if x is None else pytest.approx(x, abs=1e-5) for x in row] for row in own] == mine
            assert test["norms"][name] == pytest.approx(run["delta_norms"], rel=1e-5)
            assert test["variants"][name]["alphas"] == pytest.approx(run["alphas"], abs=1e-6)
        other = {"pm at merge-only's length": "merge-only", "merge-only at pm's length": "pm"}
        for name, target in other.items():
            assert test["variants"][name]["lengths"] == pytest.approx(test["norms"][target], rel=1e-9)
        sizes = runs["pm"]["eval_sizes"]
        for v in test["variants"].values():
            assert v["summary"] == pytest.approx(score_summary("eval_loss", v["eval_loss"], sizes))


def test_length_shares_by_hand():
    """scripts/llm_figures.py: the share of pm's extra forgetting the lengths account for, both ways."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import llm_figures

    f = {"pm": 0.5, "merge-only": 0.1, "pm at merge-only's length": 0.4, "merge-only at pm's length": 0.2}
    test = {"variants": {name: {"summary": {"forgetting": v}} for name, v in f.items()}}
    # gap 0.4: merge-only's lengths take 0.1 off pm (25%), pm's lengths add 0.1 to merge-only (25%)
    assert llm_figures.length_shares(test) == (pytest.approx(0.25), pytest.approx(0.25))
    f["pm at merge-only's length"] = 0.1  # the length is the whole cause
    test = {"variants": {name: {"summary": {"forgetting": v}} for name, v in f.items()}}
    assert llm_figures.length_shares(test)[0] == pytest.approx(1.0)
