"""`validation_features: interpolated` (docs/method.md): a trial's features piecewise linear in alpha between passes at
the knots. At a knot they are the model's own (the estimate there is the exact rule's), between two knots their chord
(`torch.lerp`), and the head alignment after a merge between knots takes a pass under the merged weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import groups

from pm_hf.config.checks import InputError
from pm_hf.config.groups import MergeArguments, RunConfig
from pm_hf.continual import build_loop
from pm_hf.heads import alignment
from pm_hf.method.strategies import build_strategy, validated
from pm_hf.run import measure
from pm_hf.run.measure import alignment_of

VALIDATED = {"merge_method": "validated-alpha", "head_align": "prototypes", "head_align_drift": "sdc"}
GRID = {"validation_grid": [0.0, 0.1, 0.2, 0.5, 1.0], "validation_patience": 0}
KNOTS = [0.0, 0.2, 1.0]


def test_the_knobs_name_their_choices():
    args = MergeArguments(**VALIDATED, merge_parameters={"validation_features": "fast"})
    with pytest.raises(InputError, match=r"^validation_features = 'fast': give 'exact' .* or 'interpolated'"):
        build_strategy(args)
    args = MergeArguments(**VALIDATED, merge_parameters={"validation_knots": [0.0, 0.5]})
    with pytest.raises(InputError, match=r"^validation_knots = \[0.0, 0.5\]: give .* 0 and 1 among them"):
        build_strategy(args)


class _Line:
    """A stand-in merge line: `at(alpha, fn)` runs fn with the model at alpha (recorded), then back at 0."""

    def __init__(self):
        self.alpha, self.visits = 0.0, []

    def at(self, alpha, fn):
        self.alpha = alpha
        self.visits.append(alpha)
        try:
            return fn()
        finally:
            self.alpha = 0.0


class _Align:
    """A stand-in alignment whose model's features of row i at alpha are known: sin(i + 3 alpha) and i * alpha^2 (a
    curve: a chord is not the features), its features before training those at 0."""

    def __init__(self, line, rows: int):
        self.line, self.labels = line, torch.arange(rows) % 3
        self.before = self.features(0.0, list(range(rows)))

    @staticmethod
    def features(alpha, rows):
        i = torch.tensor(rows, dtype=torch.float32)[:, None]
        return torch.cat([torch.sin(i + 3 * alpha), i * alpha**2], dim=1)

    def features_of(self, model, rows):
        return self.features(self.line.alpha, rows), self.labels[rows]


def test_knots_are_passes_taken_when_needed_and_the_rest_their_chords():
    line = _Line()
    align = _Align(line, 12)
    rows, heldout = [1, 4, 5, 9], [10, 11]
    knots = measure.Knots([0, 0.1, 0.2, 1], line, align, None, SimpleNamespace(train=rows), heldout, rows)
    assert line.visits == [0.0]  # the held-out rows at 0; the training rows' are those taken before training

    def exact(alpha):
        return align.features(alpha, rows), align.features(alpha, heldout)

    knots.prepare(0.1)
    (x, y), (hx, hy) = knots.at(0.1)
    assert line.visits == [0.0, 0.1] and torch.equal(y, align.labels[rows]) and torch.equal(hy, align.labels[heldout])
    assert torch.equal(x, exact(0.1)[0]) and torch.equal(hx, exact(0.1)[1])
    knots.prepare(0.13)  # between 0.1 and 0.2: the pass at 0.2 only
    assert line.visits == [0.0, 0.1, 0.2] and 1.0 not in knots.taken
    w = (0.13 - 0.1) / (0.2 - 0.1)
    (x, _), (hx, _) = knots.at(0.13)
    assert torch.equal(x, torch.lerp(exact(0.1)[0], exact(0.2)[0], w))
    assert torch.equal(hx, torch.lerp(exact(0.1)[1], exact(0.2)[1], w))
    assert not torch.allclose(x, exact(0.13)[0], atol=1e-4)  # a chord, not the features there
    knots.prepare(0.2 + 1e-12)  # the knot, within rounding: nothing new, its features exactly
    assert line.visits == [0.0, 0.1, 0.2] and torch.equal(knots.at(0.2 + 1e-12)[0][0], exact(0.2)[0])
    assert torch.equal(knots.at(0.0)[0][0], align.before[rows])
    knots.prepare(0.7)
    assert line.visits == [0.0, 0.1, 0.2, 1.0] and torch.equal(knots.at(1.0)[1][0], exact(1.0)[1])


def test_knots_at_every_grid_point_are_the_exact_rule(model_dir, tmp_path):
    """Knots at every grid point (a pass at each, the training rows' at 0 taken before training as the exact rule
    takes them on every row): the run is the exact rule's, every alpha, estimate, score and class statistic."""
    grid = [0.0, 0.3, 0.6, 1.0]
    exact = {"validation_grid": grid, "validation_patience": 0, "validation_features": "exact"}
    knots = {"validation_grid": grid, "validation_patience": 0, "validation_knots": grid}
    loops = [build_loop(RunConfig(*groups(model_dir, tmp_path / name, **VALIDATED, merge_parameters=knobs)))
             for name, knobs in (("exact", exact), ("knots", knots))]  # fmt: skip
    (a, b) = (loop.run() for loop in loops)
    for key in ("alphas", "calibrations", "accuracy_matrix"):
        assert a[key] == b[key]
    stats = [alignment_of(loop).stats for loop in loops]
    assert stats[0].keys() == stats[1].keys() and all(torch.equal(stats[0][k], stats[1][k]) for k in stats[0])


def _recording(loop, monkeypatch) -> tuple[dict, dict, list]:
    """Record the features each trial of merge t was given (`given[t]`, in the scan's order), the knots' passes of
    merge t (`taken[t]`) and, after each merge, the features the alignment took beside a fresh pass's (`merged`)."""
    align, given, taken, merged, choosing = alignment_of(loop), {}, {}, [], [None]
    known, merge, on_merge = alignment.HeadAlignment.known_features, loop.strategy.merge, align.on_merge
    correct = alignment.HeadAlignment.correct

    class Recorded(measure.Knots):
        def __init__(self, *args):
            super().__init__(*args)
            taken[choosing[0]] = self.taken

    def recording_known(self, pair):
        if choosing[0] is not None:
            given.setdefault(choosing[0], []).append(pair)
        return known(self, pair)

    def recording_correct(self, model, x, y, classes):  # the held-out rows' features a trial scores
        if choosing[0] is not None:
            given.setdefault(("heldout", choosing[0]), []).append(x)
        return correct(self, model, x, y, classes)

    def recording_merge(context):
        choosing[0] = context.t
        try:
            return merge(context)
        finally:
            choosing[0] = None

    def checking(t, model, task):
        fresh = alignment.head_features(model, align.head.module, task.train, align.stream.collate_fn, align.batch_size)
        on_merge(t, model, task)
        merged.append((t, fresh, align.after))

    monkeypatch.setattr(alignment.HeadAlignment, "known_features", recording_known)
    monkeypatch.setattr(alignment.HeadAlignment, "correct", recording_correct)
    monkeypatch.setattr(measure, "Knots", Recorded)
    loop.strategy.merge, align.on_merge = recording_merge, checking
    return given, taken, merged


@pytest.mark.slow  # two 3-task runs
def test_knots_are_passes_the_rest_their_chords_and_the_merge_aligns_on_a_pass(model_dir, tmp_path, monkeypatch):
    exact_knobs = {**GRID, "validation_features": "exact"}
    exact = build_loop(RunConfig(*groups(model_dir, tmp_path / "exact", **VALIDATED, merge_parameters=exact_knobs)))
    exact = exact.run()
    knobs = {**GRID, "validation_knots": KNOTS}
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "chord", **VALIDATED, merge_parameters=knobs)))
    given, taken, merged = _recording(loop, monkeypatch)
    choice = validated.one_se_choice  # forced between knots: every later merge aligns where the chord stands
    monkeypatch.setattr(validated, "one_se_choice", lambda estimates, errors: choice(estimates, errors) * 0 + 0.5)
    chord = loop.run()
    tasks = len(loop.stream.tasks)
    assert chord["alphas"][1:] == [0.5] * (tasks - 1)
    ours, theirs = chord["calibrations"][1]["grid"], exact["calibrations"][1]["grid"]  # the same theta_hat_1
    assert all(ours[k] == theirs[k] for k in ("0.0", "0.2", "1.0"))  # at the knots: the exact rule's estimates
    for t in range(1, tasks):
        assert sorted(taken[t]) == KNOTS
        (x0, y0), (x1, y1), (x2, y2), (x5, y5), (x10, y10) = given[t]  # alpha 0, 0.1, 0.2, 0.5, 1
        assert all(torch.equal(y, y0) for y in (y1, y2, y5, y10))
        assert [torch.equal(x, taken[t][k][0]) for x, k in ((x0, 0.0), (x2, 0.2), (x10, 1.0))] == [True] * 3
        assert torch.equal(x1, torch.lerp(x0, x2, 0.5)) and torch.equal(x5, torch.lerp(x2, x10, (0.5 - 0.2) / 0.8))
        assert not torch.equal(x1, x0) and not torch.equal(x1, x2)
        h0, h1, h2, h5, h10 = given[("heldout", t)]  # the held-out rows: the knots' passes, the chord between
        assert [torch.equal(h, taken[t][k][1]) for h, k in ((h0, 0.0), (h2, 0.2), (h10, 1.0))] == [True] * 3
        assert torch.equal(h1, torch.lerp(h0, h2, 0.5)) and torch.equal(h5, torch.lerp(h2, h10, (0.5 - 0.2) / 0.8))
    for t, fresh, used in merged:
        assert torch.equal(used, fresh[0])  # the model's own features, every merge
        if t:
            assert not torch.equal(used, given[t][3][0])  # not the chord's at the alpha merged
    assert len(merged) == tasks
