"""`validation_features: interpolated` (docs/method.md): a trial's features piecewise linear in alpha between passes at
the knots. At a knot they are the model's own (the estimate there is the exact rule's), between two knots their chord
(`torch.lerp`), and the head alignment after a merge between knots takes a pass under the merged weights."""

from __future__ import annotations

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


def _recording(loop, monkeypatch) -> tuple[dict, dict, list]:
    """Record the features each trial of merge t was given (`given[t]`, in the scan's order), the knots' passes of
    merge t (`taken[t]`) and, after each merge, the features the alignment took beside a fresh pass's (`merged`)."""
    align, given, taken, merged, choosing = alignment_of(loop), {}, {}, [], [None]
    known, merge, on_merge = alignment.HeadAlignment.known_features, loop.strategy.merge, align.on_merge

    class Recorded(measure.Knots):
        def __init__(self, *args):
            super().__init__(*args)
            taken[choosing[0]] = self.taken

    def recording_known(self, pair):
        if choosing[0] is not None:
            given.setdefault(choosing[0], []).append(pair)
        return known(self, pair)

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
    for t, fresh, used in merged:
        assert torch.equal(used, fresh[0])  # the model's own features, every merge
        if t:
            assert not torch.equal(used, given[t][3][0])  # not the chord's at the alpha merged
    assert len(merged) == tasks
