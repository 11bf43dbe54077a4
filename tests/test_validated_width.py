"""`validation_old_width: calibrated` (docs/method.md): each old class's Gaussian widened until it scores what the
head scored on the class's own training rows at its merge. The width against the normal CDF, its edge cases and
the monotone score it bisects, the widening it makes in the estimate, and the widths a run records (what the
alignment passes for each class, read by later estimates, kept through a checkpoint, grown with the head)."""

from __future__ import annotations

import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from conftest import groups

from pm_hf.config.groups import RunConfig
from pm_hf.continual import build_loop
from pm_hf.heads import alignment
from pm_hf.heads.estimate import calibrated_width, pooled_covariance, pseudo_accuracy
from pm_hf.run.evaluation import seen_classes
from pm_hf.run.measure import alignment_of, old_accuracies

CALIBRATED = {"merge_method": "validated-alpha", "head_align": "prototypes", "head_align_drift": "sdc",
              "merge_parameters": {"validation_old_width": "calibrated"}}  # fmt: skip


def test_the_width_against_the_normal_cdf():
    """Class 0 at (m, 0), covariance I, head W = I: its score at width k is Phi(m / sqrt(2k)), so the width that
    scores `target` is k = (m / (sqrt 2 Phi^-1(target)))^2; m is set for a score of 0.9 at k = 1, 0.7 is asked."""
    m = math.sqrt(2) * NormalDist().inv_cdf(0.9)
    expected = (m / (math.sqrt(2) * NormalDist().inv_cdf(0.7))) ** 2  # 5.97
    mean, eye = torch.tensor([m, 0.0]), torch.eye(2)
    got = calibrated_width(lambda k: pseudo_accuracy(eye, None, mean, k * eye, 0, [0, 1], 40000, 0), 0.7)
    assert got == pytest.approx(expected, rel=0.03)


def test_the_width_where_nothing_or_everything_is_asked():
    """A class that scores no more than its rows already keeps its covariance (1: widths only widen); one that still
    scores more at the cap gets the cap."""

    def score(mean):
        return lambda k: pseudo_accuracy(torch.eye(2), None, torch.tensor(mean), k * torch.eye(2), 0, [0, 1], 2000, 0)

    assert calibrated_width(score([1.0, 0.0]), 0.99) == 1.0
    assert calibrated_width(score([100.0, 0.0]), 0.5, high=4.0) == 4.0


def test_the_score_falls_with_the_width():
    """The bisection's premise: with one seed, the score of N(mean, k cov) never rises as k grows (3 classes, a random
    head, a random covariance)."""
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    root = torch.randn(5, 5, generator=gen)
    cov, mean = root @ root.T / 5, torch.randn(5, generator=gen) + weight[2]
    scores = [pseudo_accuracy(weight, bias, mean, k * cov, 2, [0, 1, 2], 500, 3) for k in (0.5, 1, 2, 4, 8, 16, 32)]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]


def test_the_old_classes_scaled_by_their_width():
    """Width 1 leaves `old_accuracies` as without widths; width 4 is the pooled covariance of 4 x the scatter (the
    covariance and its shrinkage are linear in it, and 4 is exact in binary), and it lowers a tight class's score."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    stats = alignment.update_class_stats({}, torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 3.0]]),
                                         torch.tensor([0, 0, 1, 1]), 2)  # fmt: skip
    align = SimpleNamespace(before=x, after=x + torch.tensor([0.0, 0.5]), stats=stats, samples=4000, widths=None)
    args = (stats["mean"], [0, 1], [0, 1], torch.eye(2), None, 0)
    plain = old_accuracies(align, *args)
    align.widths = torch.ones(2)
    assert old_accuracies(align, *args) == plain
    align.widths = torch.tensor([4.0, 4.0])
    wide = old_accuracies(align, *args)
    align.widths, align.stats = None, {**stats, "scatter": 4 * stats["scatter"]}
    assert old_accuracies(align, *args) == wide
    assert wide[0] < plain[0]


def _recorded_width(calls: list):
    """A stand-in for `calibrated_width` that records (its score at k = 1, the target) and answers a width above 1 made
    of both: what the alignment passes it shows in the widths it keeps (on the tiny model every real width is 1)."""

    def width(score, target):
        calls.append((score(1.0), target))
        return 1.5 + score(1.0) + target

    return width


@pytest.mark.slow  # 3-task runs of an opt-in knob
def test_a_run_records_each_class_width_and_resumes_with_them(model_dir, tmp_path, monkeypatch):
    """Every class's width is recorded once, at its task's merge, and kept (the stand-in's answers); the last task's
    score and target are those of its training rows under the final model and head (where they were taken: its
    draws, its seed); the estimates of later merges read the widths (their old part differs from the stored width's
    run); stopped after two tasks and resumed, the run is the uninterrupted one, widths included."""
    plain = build_loop(RunConfig(*groups(model_dir, tmp_path / "plain", **{**CALIBRATED, "merge_parameters": {}})))
    pooled = plain.run()
    calls = []
    monkeypatch.setattr(alignment, "calibrated_width", _recorded_width(calls))
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "whole", **CALIBRATED)))
    results = loop.run()
    align, tasks = alignment_of(loop), loop.stream.tasks
    classes = [c for t in tasks for c in t.classes]
    assert len(calls) == len(classes)
    assert align.widths[classes].tolist() == pytest.approx([1.5 + a + b for a, b in calls], rel=1e-6)  # (float32)
    last, seen = tasks[-1], seen_classes(tasks)
    x, y = alignment.head_features(loop.model, align.head.module, last.train, loop.stream.collate_fn, 8)
    hits, (weight, bias) = align.correct(loop.model, x, y, seen), (p.detach() for p in align.head.parameters())
    cov = pooled_covariance(align.stats, seen)
    for c, (score, target) in zip(last.classes, calls[-len(last.classes) :], strict=True):
        assert target == float(hits[y == c].double().mean())
        mean, seed = align.stats["mean"][c], loop.args.seed + c
        assert score == pseudo_accuracy(weight, bias, mean, cov, c, seen, align.samples, seed)
    old = lambda r: [m["old"] for cal in r["calibrations"][1:] for m in cal["grid"].values()]  # noqa: E731
    assert old(results) != old(pooled)
    build_loop(RunConfig(*groups(model_dir, tmp_path / "resumed", **CALIBRATED))).run(stop_after=2)
    again = build_loop(RunConfig(*groups(model_dir, tmp_path / "resumed", **CALIBRATED)))
    resumed = again.run(resume=True)
    assert resumed["alphas"] == results["alphas"] and resumed["accuracy_matrix"] == results["accuracy_matrix"]
    assert resumed["calibrations"] == results["calibrations"]
    assert torch.equal(alignment_of(again).widths, align.widths)


@pytest.mark.slow  # two short runs of an opt-in knob
def test_classes_appended_later_get_their_widths_as_in_the_longer_run(model_dir, tmp_path):
    """The head grows when a task brings new classes after `train()`: the widths grow with it (new rows 1 until their
    merge), and the staged run equals the run of all its tasks at once."""
    from test_api import numbers, task, trainer

    from pm_hf.config.groups import MergeArguments

    merge = MergeArguments(**{k: v for k, v in CALIBRATED.items()})
    tasks = [task(0, 1), task(2, 3), task(4, 5)]
    once = trainer(model_dir, tmp_path / "once", tasks, merge_args=merge)
    at_once = once.train().results
    staged = trainer(model_dir, tmp_path / "staged", tasks[:2], merge_args=merge)
    staged.train()
    assert numbers(staged.add_task(tasks[2]).train().results) == numbers(at_once)
    assert torch.equal(alignment_of(staged.loop).widths, alignment_of(once.loop).widths)
