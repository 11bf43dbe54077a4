"""`validated-alpha` (docs/method.md): the estimate's parts by hand or against a closed form, the one-standard-error
choice by hand, and the rule in the loop: it reads no eval split (the datasets it scores are the held-out parts of
the training data, and an eval split with other labels leaves every alpha as it was) and picks what its log says."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import DATA, groups

from pm_hf.config.checks import InputError
from pm_hf.config.groups import MergeArguments, RunConfig
from pm_hf.continual import build_loop
from pm_hf.heads import alignment
from pm_hf.heads.estimate import binomial_se, drift_spread, pseudo_accuracy, seen_estimate
from pm_hf.method.strategies import build_strategy
from pm_hf.method.strategies.validated import one_se_choice, paired_choice, paired_errors, scan
from pm_hf.run import loop as loop_module
from pm_hf.run.evaluation import seen_classes
from pm_hf.run.measure import alignment_of, old_accuracies

VALIDATED = {"merge_method": "validated-alpha", "head_align": "prototypes", "head_align_drift": "sdc"}


def test_drift_spread_by_hand():
    means = torch.zeros(1, 2)
    before = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # equally far from the class mean: weights 1/2 each
    moved = before + torch.tensor([3.0, -2.0])  # a pure translation: compensation predicts all of it
    assert torch.equal(drift_spread(means, [0], before, moved)[0], torch.zeros(2, 2, dtype=torch.float64))
    split = before + torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # drifts +1 and -1 around a mean drift of 0
    expected = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(drift_spread(means, [0], before, split)[0], expected)


def test_pseudo_accuracy_against_the_normal_cdf():
    """Class 0 at (m, 0) with covariance s^2 I under the head W = I: correct when x0 > x1, P = Phi(m / (s sqrt 2))."""
    weight, m, s = torch.eye(2), 1.0, 1.5
    got = pseudo_accuracy(weight, None, torch.tensor([m, 0.0]), s**2 * torch.eye(2), 0, [0, 1], 40000, seed=0)
    assert got == pytest.approx(0.5 * (1 + math.erf(m / (s * math.sqrt(2)) / math.sqrt(2))), abs=0.01)
    assert pseudo_accuracy(weight, None, torch.tensor([5.0, 0.0]), 1e-4 * torch.eye(2), 1, [0, 1], 50, 0) == 0.0


def test_the_estimate_and_its_error_by_hand():
    assert seen_estimate(0.5, 2, {0: 1.0, 1: 0.9}) == pytest.approx((0.5 * 2 + 1.9) / 4)
    assert binomial_se(0.9, 100) == pytest.approx(0.03)


def test_the_old_classes_widened_by_the_rows_given():
    """`old_accuracies` widens each old class by the unpredicted drift of the trial's training rows, or of the rows
    `moved` gives (the held-out part, `validation_drift: heldout`): a translation of either widens nothing, and the
    held-out rows' spread is what counts once given."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    stats = alignment.update_class_stats({}, torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 3.0]]),
                                         torch.tensor([0, 0, 1, 1]), 2)  # fmt: skip
    spread = x + torch.tensor([[0.0, 2.0], [0.0, -2.0], [2.0, 0.0], [-2.0, 0.0]])  # drifts unlike one another
    align = SimpleNamespace(before=x, after=spread, stats=stats, samples=4000, widths=None)
    args = (stats["mean"], [0], [0, 1], torch.eye(2), None, 0)
    widened, translated = old_accuracies(align, *args), old_accuracies(align, *args, moved=(x, x + 5.0))
    assert widened[0] < translated[0]
    align.after = x - 3.0  # the training rows translated: the same as held-out rows translated
    assert old_accuracies(align, *args) == translated
    assert old_accuracies(align, *args, moved=(x, spread)) == widened


def test_one_standard_error_rule_by_hand():
    estimates = {0.0: 0.80, 0.1: 0.85, 0.5: 0.86, 1.0: 0.70}
    assert one_se_choice(estimates, dict.fromkeys(estimates, 0.02)) == 0.1  # 0.85 >= 0.86 - 0.02 > 0.80
    assert one_se_choice(estimates, dict.fromkeys(estimates, 0.0)) == 0.5  # no doubt: the best
    assert one_se_choice(estimates, dict.fromkeys(estimates, 0.1)) == 0.0  # nothing told apart: move least


def test_the_paired_rule_by_hand():
    """4 held-out samples, the new classes' share 1/2 (0.5 per correct sample). alpha 0.2 is the best; alpha 0.1 gets
    the same samples right (its paired error 0: only the old classes' 0.01 separates them); alpha 0 gets two others
    right and one fewer (best minus it per sample: 0.5, 0.5, 0, -0.5)."""
    correct = {0.0: [0.0, 0.0, 0.5, 0.5], 0.1: [0.5, 0.5, 0.5, 0.0], 0.2: [0.5, 0.5, 0.5, 0.0]}
    estimates = {0.0: 0.4, 0.1: 0.44, 0.2: 0.45}  # the old classes' part differs a little (0.01 between 0.1 and 0.2)
    errors = paired_errors(estimates, correct)
    assert errors[0.2] == 0.0 and errors[0.1] == 0.0  # the same samples right and wrong: nothing told apart by them
    d = [0.5, 0.5, 0.0, -0.5]  # best minus alpha 0, per sample
    mean = sum(d) / 4
    assert errors[0.0] == pytest.approx((sum((x - mean) ** 2 for x in d) / 4) ** 0.5 / 2)  # 0.4146 / 2 = 0.207
    assert paired_choice(estimates, correct) == 0.0  # 0.4 >= 0.45 - 0.207: alpha 0 not told apart from the best
    assert paired_choice({**estimates, 0.0: 0.2}, correct) == 0.2  # 0.2 < 0.243; 0.1 below by 0.01 with error 0
    # the marginal rule with the best's binomial error (share * sqrt(p (1 - p) / n) = 0.5 * 0.2165) would take 0.1:
    assert one_se_choice({**estimates, 0.0: 0.2}, dict.fromkeys(estimates, 0.5 * binomial_se(0.75, 4))) == 0.1


def test_the_scan_stops_after_points_far_below_the_best_by_hand():
    """Ascending alphas; with patience 2 at 2 errors (0.02 each) the scan stops at the second point in a row below
    best - 0.04 (5 estimates of 6); a climb after it is missed (the assumption: the estimate falls with alpha as the old
    classes drift); patience 0 scans the whole grid."""
    curve = {0.0: 0.80, 0.1: 0.86, 0.2: 0.83, 0.3: 0.81, 0.4: 0.79, 0.5: 0.90}  # 0.5: a late climb the scan misses
    asked = []

    def estimate(alpha):
        asked.append(alpha)
        return {"estimate": curve[alpha], "se": 0.02}

    measured = scan([0.5, 0.4, 0.3, 0.2, 0.1, 0.0], estimate, patience=2, stop_se=2.0)
    assert asked == [0.0, 0.1, 0.2, 0.3, 0.4] and list(measured) == asked  # 0.83 within 0.04 of 0.86; 0.81, 0.79 not
    asked.clear()
    assert list(scan(list(curve), estimate, patience=1, stop_se=2.0)) == [0.0, 0.1, 0.2, 0.3]  # the default: 0.81
    asked.clear()
    assert list(scan(list(curve), estimate, patience=3, stop_se=2.0)) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    asked.clear()
    assert list(scan(list(curve), estimate, patience=0, stop_se=2.0)) == list(curve)  # 0: never stops
    assert one_se_choice({a: curve[a] for a in measured}, dict.fromkeys(measured, 0.02)) == 0.1  # the whole grid: 0.5


def test_it_needs_the_prototype_head():
    with pytest.raises(InputError, match=r"^head_align = 'none': "):
        build_strategy(MergeArguments(merge_method="validated-alpha"))


def _recorded_run(model_dir, out, monkeypatch, **kw):
    """A 3-task run with `validated-alpha`; returns (results, loop, the datasets scored while a merge was chosen:
    every dataset predicted by the evaluator or passed through the model for the head's features, the number of
    features passes in the whole run)."""
    loop = build_loop(RunConfig(*groups(model_dir, out, **VALIDATED, **kw)))
    scored, choosing, passes = [], [False], [0]
    predict, merge, features = loop.evaluator.predict, loop.strategy.merge, alignment.head_features

    def recording_predict(dataset):
        if choosing[0]:
            scored.append(dataset)
        return predict(dataset)

    def recording_features(model, head, dataset, *args):
        passes[0] += 1
        if choosing[0]:
            scored.append(dataset)
        return features(model, head, dataset, *args)

    monkeypatch.setattr(alignment, "head_features", recording_features)

    def recording_merge(context):
        choosing[0] = True
        try:
            return merge(context)
        finally:
            choosing[0] = False

    loop.evaluator.predict, loop.strategy.merge = recording_predict, recording_merge
    return loop.run(), loop, scored, passes[0]


@pytest.fixture(scope="module")
def plain_run(model_dir, tmp_path_factory):
    """The recorded 3-task run with the rule's defaults, shared by the tests that read it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _recorded_run(model_dir, tmp_path_factory.mktemp("validated") / "run", monkeypatch)


def _far(points: list[dict], k: int) -> bool:
    """Point k is more than 2 standard errors below the best of the points up to it."""
    best = max(points[: k + 1], key=lambda p: p["estimate"])
    return points[k]["estimate"] < best["estimate"] - 2 * best["se"]


@pytest.mark.xdist_group("validated-plain-run")  # one worker runs the shared run once
def test_the_rule_reads_no_eval_split_and_picks_what_it_logs(plain_run, model_dir, tmp_path, monkeypatch):
    results, loop, scored, _ = plain_run
    tasks = loop.stream.tasks
    heldout = [d for d in scored if any(d is task.heldout for task in tasks[1:])]
    assert heldout and not any(d is task.eval for d in scored for task in tasks)

    def rows(dataset) -> set:
        return {tuple(ids) for ids in dataset.with_format(None)["input_ids"]}

    trained = set().union(*(rows(task.train) for task in tasks))
    others = [d for d in scored if not any(d is task.heldout for task in tasks)]  # a trial's alignment samples
    assert others and all(rows(d) <= trained for d in others)  # rows the task trained on, nothing else
    first = results["calibrations"][0]  # the first merge: whole or half by the move of its held-out rows' features
    assert first["first_move"]["rows"] == len(tasks[0].heldout) and any(d is tasks[0].heldout for d in scored)
    assert results["alphas"][0] == (1.0 if first["first_move"]["move"] <= first["first_move_limit"] else 0.5)
    for t in range(1, len(tasks)):
        grid = {float(a): m for a, m in results["calibrations"][t]["grid"].items()}
        assert list(grid) == [i / 10 for i in range(len(grid))]  # scanned from 0 up, stopped or whole
        assert all(0 <= m["estimate"] <= 1 and m["se"] >= 0 for m in grid.values())
        far = [_far(list(grid.values()), k) for k in range(len(grid))]
        assert not any(far[:-1]) and (far[-1] or len(grid) == 11)  # cut at its first point 2 errors below the best
        choice = one_se_choice({a: m["estimate"] for a, m in grid.items()}, {a: m["se"] for a, m in grid.items()})
        assert results["alphas"][t] == choice
        assert len(tasks[t].heldout) == math.ceil(0.1 * (len(tasks[t].train) + len(tasks[t].heldout)))
    # an eval split with other labels: other accuracies, the same alphas
    test = pd.read_parquet(DATA / "test.parquet")
    test["label"] = test["label"].sample(frac=1.0, random_state=0).to_numpy()
    test.to_parquet(tmp_path / "scrambled.parquet")
    files = {"train": str(DATA / "train.parquet"), "test": str(tmp_path / "scrambled.parquet")}
    other, *_ = _recorded_run(model_dir, tmp_path / "scrambled", monkeypatch, data_files=files)
    assert other["alphas"] == results["alphas"] and other["accuracy_matrix"] != results["accuracy_matrix"]


def _same_run(results, loop, other_results, other) -> None:
    """Two runs chose the same alphas from the same estimates, measured the same accuracies and keep exactly the same
    class statistics."""
    for key in ("alphas", "calibrations", "accuracy_matrix"):
        assert results[key] == other_results[key]
    stats, other_stats = alignment_of(loop).stats, alignment_of(other).stats
    assert stats.keys() == other_stats.keys() and all(torch.equal(stats[k], other_stats[k]) for k in stats)


@pytest.mark.slow  # two 3-task runs of the opt-in exact features
def test_reused_features_are_those_a_pass_takes(model_dir, tmp_path, monkeypatch):
    """`validation_features: exact`: the trial at alpha = 0 and the alignment after the merge reuse features taken
    already (theta_hat_{t-1}'s, the trial's at the merged alpha): two passes fewer per merged task, and the run is what
    it is with every pass taken."""
    exact = {"merge_parameters": {"validation_features": "exact"}}
    reused, loop, _, reused_calls = _recorded_run(model_dir, tmp_path / "reused", monkeypatch, **exact)
    assert all(len(task.train) <= 256 for task in loop.stream.tasks)  # every trial took every row
    calls = []
    features = alignment.head_features
    monkeypatch.setattr(alignment, "head_features", lambda *a: calls.append(a[2]) or features(*a))
    monkeypatch.setattr(alignment.HeadAlignment, "known_features", lambda self, pair: contextlib.nullcontext())
    other = build_loop(RunConfig(*groups(model_dir, tmp_path / "passes", **VALIDATED, **exact)))
    passes = other.run()
    assert reused_calls == len(calls) - 2 * (len(loop.stream.tasks) - 1)
    _same_run(reused, loop, passes, other)


@pytest.mark.slow  # two 3-task runs
def test_a_merge_at_zero_aligns_on_the_features_taken_before_training(model_dir, tmp_path, monkeypatch):
    """Trials on a subset of the task's rows (`validation_samples` below their number): after a merge at alpha = 0
    (theta_hat_{t-1} kept) the alignment reuses every row's features taken before training, one pass fewer per task
    after the first, and the run is what it is with that pass taken."""
    knobs = {"merge_parameters": {"validation_samples": 8, "validation_grid": [0.0]}}
    reused, loop, _, reused_calls = _recorded_run(model_dir, tmp_path / "reused", monkeypatch, **knobs)
    assert all(len(task.train) > 8 for task in loop.stream.tasks) and reused["alphas"][1:] == [0.0, 0.0]
    calls, pairs = [], []
    features, on_merge = alignment.head_features, alignment.HeadAlignment.on_merge
    monkeypatch.setattr(alignment, "head_features", lambda *a: calls.append(a[2]) or features(*a))
    monkeypatch.setattr(loop_module, "reused_features", lambda *a: contextlib.nullcontext())  # a pass after merging

    def recording_on_merge(self, t, model, task):  # the features before training and the pass after the merge
        on_merge(self, t, model, task)
        pairs.append((t, self.before, self.after))

    monkeypatch.setattr(alignment.HeadAlignment, "on_merge", recording_on_merge)
    other = build_loop(RunConfig(*groups(model_dir, tmp_path / "passes", **VALIDATED, **knobs)))
    passes = other.run()
    assert reused_calls == len(calls) - (len(loop.stream.tasks) - 1)
    later = [(before, after) for t, before, after in pairs if t >= 1]
    assert len(later) == 2 and all(after is not before and torch.equal(after, before) for before, after in later)
    _same_run(reused, loop, passes, other)


@pytest.mark.slow  # two 3-task runs
def test_logging_the_eval_score_beside_the_estimate_changes_nothing(model_dir, tmp_path):
    """`validation_log_eval` (diagnostics) logs, beside each scanned alpha's estimate, the eval-split score of that
    merge with the head the run would align there; the run (every alpha, every score, the class statistics) is the
    same as without it, and the logged score of the chosen alpha is the accuracy the run then measures."""
    plain_loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "plain", **VALIDATED)))
    plain = plain_loop.run()
    logged_loop = build_loop(
        RunConfig(*groups(model_dir, tmp_path / "logged", **VALIDATED, merge_parameters={"validation_log_eval": True}))
    )
    logged = logged_loop.run()
    for key in ("alphas", "accuracy_matrix"):
        assert logged[key] == plain[key]
    stats, plain_stats = alignment_of(logged_loop).stats, alignment_of(plain_loop).stats
    assert all(torch.equal(stats[k], plain_stats[k]) for k in stats)
    sizes = [len(task.eval) for task in logged_loop.stream.tasks]
    for t in range(1, len(sizes)):
        grid = logged["calibrations"][t]["grid"]
        assert all("eval" not in m for m in plain["calibrations"][t]["grid"].values())
        assert [{k: v for k, v in m.items() if k != "eval"} for m in grid.values()] == list(
            plain["calibrations"][t]["grid"].values()
        )
        row = logged["accuracy_matrix"][t][: t + 1]  # the seen tasks after merge t, weighted by their eval sizes
        seen = sum(a * n for a, n in zip(row, sizes)) / sum(sizes[: t + 1])
        assert grid[str(logged["alphas"][t])]["eval"] == pytest.approx(seen, abs=1e-9)


@pytest.mark.slow  # a 3-task run of an opt-in knob that measured worse (docs/results.md)
def test_the_first_task_chosen_too_by_its_held_out_data(model_dir, tmp_path):
    """`validation_first_task`: the first task's alpha is chosen by the same rule, on its held-out training data alone
    (no old classes yet: the estimate is the new classes' held-out accuracy, its error the binomial one), and the
    eval score logged beside the chosen alpha (diagnostics) is the accuracy the run then measures on the first task."""
    knobs = {"validation_first_task": True, "validation_log_eval": True}
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "first", **VALIDATED, merge_parameters=knobs)))
    results = loop.run()
    first = {float(a): m for a, m in results["calibrations"][0]["grid"].items()}
    assert list(first) == [i / 10 for i in range(len(first))]
    n = len(loop.stream.tasks[0].heldout)
    for m in first.values():
        assert m["old"] is None and m["estimate"] == m["new"] and m["se"] == pytest.approx(binomial_se(m["new"], n))
        assert round(m["new"] * n) == pytest.approx(m["new"] * n, abs=1e-9)  # a count of held-out samples
    for t in range(len(loop.stream.tasks)):
        grid = {float(a): m for a, m in results["calibrations"][t]["grid"].items()}
        choice = one_se_choice({a: m["estimate"] for a, m in grid.items()}, {a: m["se"] for a, m in grid.items()})
        assert results["alphas"][t] == choice
    assert first[results["alphas"][0]]["eval"] == pytest.approx(results["accuracy_matrix"][0][0], abs=1e-9)


@pytest.mark.slow  # a 3-task run of an opt-in knob that measured level with the default rule (docs/results.md)
def test_the_paired_rule_picks_what_its_samples_say(model_dir, tmp_path):
    """`validation_paired`: each merge's choice is `paired_choice` of its logged estimates and of the per-sample scores
    the estimate measured (each held-out sample's correctness times the new classes' share: their mean is the share of
    the logged held-out accuracy), and the paired errors it logs are those of these scores."""
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "paired", **VALIDATED, merge_parameters={
        "validation_paired": True})))  # fmt: skip
    merge, measured = loop.strategy.merge, {}

    def recording(context):
        plan = merge(context)
        measured[context.t] = context.validation.correct if context.t else None
        return plan

    loop.strategy.merge = recording
    results = loop.run()
    tasks = loop.stream.tasks
    for t in range(1, len(tasks)):
        grid = {float(a): m for a, m in results["calibrations"][t]["grid"].items()}
        correct, share = measured[t], len(tasks[t].classes) / len(seen_classes(tasks[: t + 1]))
        assert set(correct) == set(grid) and all(len(v) == len(tasks[t].heldout) for v in correct.values())
        for alpha, m in grid.items():
            assert sum(correct[alpha]) / len(correct[alpha]) == pytest.approx(share * m["new"], abs=1e-12)
        estimates = {a: m["estimate"] for a, m in grid.items()}
        errors = paired_errors(estimates, correct)
        assert all(m["se_paired"] == pytest.approx(errors[a], abs=1e-12) for a, m in grid.items())
        assert results["alphas"][t] == paired_choice(estimates, correct)


def _forced(loop, shift) -> dict:
    """Wrap the strategy so the second merge's scan from theta_0 reads `shift(alpha)` higher; returns what the wrapper
    saw: the task vector of the second task."""
    merge, seen = loop.strategy.merge, {}

    def forcing(context):
        if context.t == 1:
            make = context._make["reverted"]
            context._make["reverted"] = lambda: _shifted(make(), shift)
            seen["vector"] = context.vector
        return merge(context)

    loop.strategy.merge = forcing
    return seen


def _shifted(validation, shift):
    estimate = validation.estimate
    validation.estimate = lambda a: {**estimate(a), "estimate": estimate(a)["estimate"] + shift(a)}
    return validation


UNDO, KEEP = (lambda a: 0.5 - a), (lambda a: -2.0)  # the undo taken at alpha 0; never taken


@pytest.mark.slow  # four 3-task runs of an opt-in knob
def test_revisiting_the_first_merge(model_dir, tmp_path):
    """`validation_revisit_first`: the second merge is scanned from theta_0 too. Where the data do not ask for the
    undo, the run is the plain run exactly (the scan from theta_0 leaves weights, head and statistics as they were;
    both lines of the second merge take a pass per trial, which the plain run's interpolated features equal at the
    knots, all this scan reaches);
    where the undo is taken (forced here, at alpha 0), the merged model is theta_0 on every key the task vector holds
    and the first task's classes are kept with their statistics under theta_0 (no drift from there: exactly)."""
    # the first task at alpha = 1 (the default until stop 44): this tiny run's second scan then stays within the
    # knots, where the kept line's exact passes must equal the plain run's interpolated features
    first = {"validation_first_alpha": 1.0}
    plain = build_loop(RunConfig(*groups(model_dir, tmp_path / "plain", **VALIDATED, merge_parameters=first))).run()
    knobs = {"validation_revisit_first": True, **first}
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "revisit", **VALIDATED, merge_parameters=knobs)))
    _forced(loop, KEEP)  # (this tiny run undoes it unforced)
    results = loop.run()
    second = results["calibrations"][1]
    assert set(second["reverted_grid"]) and second["reverted"] is False
    assert {float(a) for a in second["grid"]} <= {0.0, 0.1, 0.2, 1.0}  # the default knots
    assert second["grid"] == plain["calibrations"][1]["grid"]
    assert results["alphas"] == plain["alphas"] and results["accuracy_matrix"] == plain["accuracy_matrix"]
    forced = build_loop(RunConfig(*groups(model_dir, tmp_path / "forced", **VALIDATED, merge_parameters=knobs)))
    theta0, seen = {k: v.clone() for k, v in forced.strategy.pretrained.items()}, _forced(forced, UNDO)
    results = forced.run(stop_after=2)
    assert results["calibrations"][1]["reverted"] is True and results["alphas"][1] == 0.0
    state = forced.weights.state()
    assert all(torch.equal(state[k].float(), theta0[k]) for k in seen["vector"].deltas if k in theta0)
    align, first = alignment_of(forced), forced.stream.tasks[0]
    x, y = alignment.head_features(forced.model, align.head.module, first.train, forced.stream.collate_fn, 8)
    for c in first.classes:
        torch.testing.assert_close(align.stats["mean"][c], x[y == c].mean(0).float(), rtol=0, atol=1e-5)
        assert align.stats["count"][c] == (y == c).sum()
    assert not align.origin  # kept no longer than the second merge
    # stopped after the first task and resumed: the statistics under theta_0 come back from the checkpoint
    build_loop(RunConfig(*groups(model_dir, tmp_path / "resumed", **VALIDATED, merge_parameters=knobs))).run(
        stop_after=1
    )
    again = build_loop(RunConfig(*groups(model_dir, tmp_path / "resumed", **VALIDATED, merge_parameters=knobs)))
    _forced(again, UNDO)
    resumed = again.run(resume=True, stop_after=2)
    assert resumed["alphas"] == results["alphas"] and resumed["accuracy_matrix"] == results["accuracy_matrix"]
    assert all(torch.equal(alignment_of(again).stats[k], align.stats[k]) for k in align.stats)
