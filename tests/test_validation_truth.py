"""scripts/validation_truth.py by hand: the estimate's bias at the grid's ends, the chosen and the eval-best alpha and
the accuracy given up, on grids worked out by hand; and the committed diagnostics runs are pm-validated-exact's runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("validation_truth", ROOT / "scripts" / "validation_truth.py")
vt = importlib.util.module_from_spec(spec)
sys.modules.setdefault("validation_truth", vt)
spec.loader.exec_module(vt)


def _point(estimate, evaluated, se=0.02):
    return {"estimate": estimate, "eval": evaluated, "se": se, "new": 0.0, "old": 0.0}


def test_merge_facts_by_hand():
    grid = {0.0: _point(0.90, 0.80), 0.5: _point(0.85, 0.86), 1.0: _point(0.70, 0.86)}
    f = vt.merge_facts(grid, chosen=0.0)
    assert f["bias_low"] == pytest.approx(10.0) and f["bias_high"] == pytest.approx(-16.0)
    assert f["best"] == 0.5  # the first best on the eval splits (1.0 ties it)
    assert f["regret"] == pytest.approx(6.0) and f["se"] == pytest.approx(2.0)
    row = vt.suite_row([{"seed": 0, "alphas": [1.0, 0.0, 0.5], "calibrations": [None, {"grid": grid}, {"grid": grid}]}])
    assert row["merges"] == 2 and row["hits"] == 1 and row["regret"] == pytest.approx(3.0)


def test_a_run_without_eval_scores_is_refused():
    run = {"seed": 0, "alphas": [1.0, 0.0], "calibrations": [None, {"grid": {"0.0": {"estimate": 0.5, "se": 0.1}}}]}
    with pytest.raises(ValueError, match="without its eval score"):
        vt.merges(run)


def test_the_committed_diagnostics_runs_are_the_exact_rules_runs():
    """Logging the eval scores and scanning the whole grid changed nothing: each committed diagnostics run has the
    alphas and the accuracy matrix of the committed pm-validated-exact run of its suite and seed (the rule they ran)."""
    paths = sorted(ROOT.glob("results/*/validation_truth/seed*.json"))
    assert paths
    for path in paths:
        diag = json.loads(path.read_text())
        exact = json.loads((path.parent.parent / "runs" / "pm-validated-exact" / path.name).read_text())
        assert diag["alphas"] == exact["alphas"] and diag["accuracy_matrix"] == exact["accuracy_matrix"]
        assert diag["base_weights_sha256"] == exact.get("base_weights_sha256", diag["base_weights_sha256"])


def test_other_choices_by_hand():
    # estimates 0.80, 0.86, 0.84, 0.70: best at 0.1; smoothed (0.83, 0.8333, 0.80, 0.77): best at 0.1 too
    grid = {a: _point(e, v) for a, e, v in [(0.0, 0.80, 0.70), (0.1, 0.86, 0.75), (0.2, 0.84, 0.80), (0.3, 0.70, 0.60)]}
    assert vt.argmax_choice(grid) == 0.1 and vt.smoothed_choice(grid) == 0.1
    # a lone high estimate at 0.4: the best estimate takes it; smoothed, 0.0's (0.85 + 0.86) / 2 = 0.855 is best
    estimates = [0.85, 0.86, 0.85, 0.60, 0.93, 0.60]
    evals = [0.80, 0.79, 0.78, 0.70, 0.60, 0.60]
    grid = {i / 10: _point(e, v) for i, (e, v) in enumerate(zip(estimates, evals))}
    assert vt.argmax_choice(grid) == 0.4 and vt.smoothed_choice(grid) == 0.0
    run = {"seed": 0, "alphas": [1.0, 0.0], "calibrations": [None, {"grid": grid}]}
    regrets = vt.other_regrets([run])
    assert regrets == {"best estimate": pytest.approx(20.0), "best smoothed estimate": pytest.approx(0.0)}
