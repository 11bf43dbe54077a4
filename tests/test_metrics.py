"""Tests for pm_hf.run.metrics: hand-computed CL metrics, validation errors, and atomic PNG plots; the classifier's
scores of a task from one prediction pass."""

from __future__ import annotations

import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from pm_hf.heads.head import ClassMask
from pm_hf.run import metrics
from pm_hf.run.evaluation import ClassifierEvaluator

NAN = math.nan
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# R[t][j] = score on task j after training task t.
R3 = [
    [0.90, NAN, NAN],
    [0.95, 0.80, NAN],
    [0.50, 0.70, 0.90],
]
# ACC  = (0.50 + 0.70 + 0.90) / 3                                  = 2.10 / 3 = 0.70
# AAA  = (0.90 + (0.95 + 0.80) / 2 + 0.70) / 3 = (0.90 + 0.875 + 0.70) / 3 = 2.475 / 3 = 0.825
# BWT  = ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = (-0.40 - 0.10) / 2 = -0.25
# F    = j=0: max(0.90, 0.95) - 0.50 = 0.45 ; j=1: max(0.80) - 0.70 = 0.10 ; mean = 0.275
#        (differs from -BWT because task 0 first improved to 0.95 before dropping)
SIZES = [100, 300, 600]
# weighted ACC = (0.50*100 + 0.70*300 + 0.90*600) / 1000 = (50 + 210 + 540) / 1000 = 0.80
# weighted AAA rows: t=0: 0.90 ; t=1: (0.95*100 + 0.80*300) / 400 = 335 / 400 = 0.8375 ; t=2: 0.80
#              AAA = (0.90 + 0.8375 + 0.80) / 3 = 2.5375 / 3 = 0.845833...


def test_hand_computed_3x3():
    assert metrics.final_accuracy(R3) == pytest.approx(0.70)
    assert metrics.average_accuracy(R3) == pytest.approx(0.825)
    assert metrics.backward_transfer(R3) == pytest.approx(-0.25)
    assert metrics.forgetting(R3) == pytest.approx(0.275)


def test_summarize_returns_plain_floats_and_accepts_ndarray_and_ragged():
    ragged = [[0.90], [0.95, 0.80], [0.50, 0.70, 0.90]]
    for R in (R3, np.array(R3), ragged):
        out = metrics.summarize(R)
        assert set(out) == {"acc", "aaa", "bwt", "forgetting"}
        assert all(type(v) is float for v in out.values())
        assert out == pytest.approx({"acc": 0.70, "aaa": 0.825, "bwt": -0.25, "forgetting": 0.275})


def test_single_task_edge_case():
    R = [[0.7]]
    assert metrics.summarize(R) == pytest.approx({"acc": 0.7, "aaa": 0.7, "bwt": 0.0, "forgetting": 0.0})
    assert metrics.weighted_final_accuracy(R, [42]) == pytest.approx(0.7)


def test_weighted_vs_unweighted():
    assert metrics.weighted_final_accuracy(R3, SIZES) == pytest.approx(0.80)
    assert metrics.final_accuracy(R3, SIZES) == pytest.approx(0.80)
    assert metrics.average_accuracy(R3, SIZES) == pytest.approx(2.5375 / 3)
    out = metrics.summarize(R3, sizes=SIZES)
    # BWT and forgetting stay per-task means, only ACC/AAA are weighted.
    assert out == pytest.approx({"acc": 0.80, "aaa": 2.5375 / 3, "bwt": -0.25, "forgetting": 0.275})
    # Equal sizes reduce to the unweighted means.
    assert metrics.summarize(R3, sizes=[7, 7, 7]) == pytest.approx(metrics.summarize(R3))


def test_no_forgetting_gives_zero_forgetting_and_positive_bwt():
    R = [[0.5, NAN], [0.6, 0.8]]  # task 0 improved after task 1
    assert metrics.backward_transfer(R) == pytest.approx(0.1)
    assert metrics.forgetting(R) == pytest.approx(-0.1)  # max over t in [0, 0] is R[0][0] = 0.5


@pytest.mark.parametrize(
    ("R", "match"),
    [
        ([[0.9, 0.1, 0.2], [0.8, 0.7, 0.3]], r"square.*\(2, 3\)"),
        ([0.9, 0.8], r"square.*\(2,\)"),
        (np.zeros((0, 0)), r"non-empty"),
        ([[0.9, 0.5], [0.8, 0.7]], r"R\[0\]\[1\] = 0\.5 is above the diagonal.*NaN"),
        ([[0.9, NAN], [NAN, 0.7]], r"R\[1\]\[0\] = nan is on/below the diagonal"),
        ([[NAN, NAN], [0.8, 0.7]], r"R\[0\]\[0\] = nan"),
        ([[0.9, NAN], [0.8, math.inf]], r"R\[1\]\[1\] = inf"),
        ([["a", NAN], [0.8, 0.7]], r"numeric"),
        ([[0.9, NAN], [0.8]], r"numeric"),
    ],
)
def test_matrix_validation_errors(R, match):
    with pytest.raises(ValueError, match=match):
        metrics.summarize(R)


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ([100, 300], r"sizes must have one entry per task.*\(3,\).*got shape \(2,\)"),
        ([[100, 300, 600]], r"got shape \(1, 3\)"),
        ([100, 0, 600], r"> 0"),
        ([100, -1, 600], r"> 0"),
        ([100, NAN, 600], r"finite"),
    ],
)
def test_sizes_validation_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        metrics.weighted_final_accuracy(R3, sizes)
    with pytest.raises(ValueError, match=match):
        metrics.summarize(R3, sizes=sizes)


def _assert_png_only(tmp_path, path, expected_name):
    assert path == str(tmp_path / expected_name)
    data = (tmp_path / expected_name).read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == [expected_name]  # no *.tmp.png left behind


def test_plot_accuracy_matrix(tmp_path):
    out = metrics.plot_accuracy_matrix(R3, tmp_path / "matrix.png", task_names=["a", "b", "c"], title="P&M")
    _assert_png_only(tmp_path, out, "matrix.png")
    with pytest.raises(ValueError, match="task_names must have 3 entries"):
        metrics.plot_accuracy_matrix(R3, tmp_path / "bad.png", task_names=["a"])


def test_plot_accuracy_matrix_overwrites_and_handles_raw_scores(tmp_path):
    path = tmp_path / "m.png"
    path.write_bytes(b"old")
    metrics.plot_accuracy_matrix([[12.5, NAN], [11.0, 30.0]], path)  # ROUGE-like scores, not fractions
    _assert_png_only(tmp_path, str(path), "m.png")


def test_plot_accuracy_curve(tmp_path):
    out = metrics.plot_accuracy_curve(
        [0.9, 0.85, 0.8], [NAN, 0.6, 0.4], str(tmp_path / "curve.png"), title="t", alphas_raw=[NAN, 0.7, -0.1]
    )
    _assert_png_only(tmp_path, out, "curve.png")
    with pytest.raises(ValueError, match=r"seen_acc and alphas must be.*got shapes \(3,\) and \(2,\)"):
        metrics.plot_accuracy_curve([0.9, 0.85, 0.8], [0.5, 0.5], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"alphas_raw"):
        metrics.plot_accuracy_curve([0.9], [0.5], tmp_path / "bad.png", alphas_raw=[0.1, 0.2])


def test_plot_method_curves(tmp_path):
    curves = {"P&M": [0.9, 0.85, 0.8], "seq-FT": [0.9, 0.5, 0.33], "joint": [0.9, 0.88]}
    out = metrics.plot_method_curves(curves, tmp_path / "sub" / "bench.png", title="bench", ylabel="ACC")
    assert out == str(tmp_path / "sub" / "bench.png")
    data = (tmp_path / "sub" / "bench.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["bench.png"]
    with pytest.raises(ValueError, match="at least one method"):
        metrics.plot_method_curves({}, tmp_path / "bad.png")


def test_seen_accuracy_is_the_correctly_rounded_pooled_score_in_any_task_order():
    """sum_j s_j v_j / sum_j s_j with both sums correctly rounded (exact rational arithmetic as the reference): the
    same bits on every CPU and in every task order, which a BLAS dot does not promise (a summary rebuilt on another
    machine must equal the committed one)."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        scores = rng.random(n).round(int(rng.integers(2, 17)))
        sizes = rng.integers(1, 5000, n).astype(float)
        exact = float(sum(Fraction(float(v * s)) for v, s in zip(scores, sizes))) / float(sum(map(Fraction, sizes)))
        assert metrics.seen_accuracy(scores, sizes) == exact
        order = rng.permutation(n)
        assert metrics.seen_accuracy(scores[order], sizes[order]) == exact


def test_a_tasks_scores_from_one_pass_equal_two_masked_passes():
    """`ClassifierEvaluator.scores` predicts once (masked to the seen classes) and takes the within-task accuracy from
    those logits: equal to a second pass masked to the task's classes, ties included (a masked pass takes the first
    of equal maxima in class order; the task's classes are given out of order here)."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(60, 6, generator=gen)
    raw[:10, 4] = raw[:10, 1]  # ties between the task's two classes
    labels = torch.tensor([1, 4])[torch.randint(0, 2, (60,), generator=gen)]
    mask, calls = ClassMask(torch.nn.Linear(1, 6), 6), []

    def predict(dataset):
        calls.append(len(dataset))
        return mask._hook(None, None, raw).numpy()

    evaluator = ClassifierEvaluator(SimpleNamespace(set_active=mask.set_active), predict)
    task = SimpleNamespace(eval=datasets.Dataset.from_dict({"labels": labels.tolist()}), classes=[4, 1])
    scores = evaluator.scores(task, [0, 1, 2, 4])
    assert calls == [60]
    assert scores == {"accuracy": evaluator.accuracy(task.eval, [0, 1, 2, 4]),
                      "til_accuracy": evaluator.accuracy(task.eval, task.classes)}  # fmt: skip
    assert evaluator.pre_merge(task, [0, 1, 2, 4]) == (scores["accuracy"], scores["til_accuracy"])
