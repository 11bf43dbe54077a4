"""`validated-alpha`'s first merge (docs/method.md): whole where the adapter moves the features of the first task's
held-out rows by at most `validation_first_move_limit` times their spread, else at `validation_first_alpha`; the move
by hand; its two passes leave the weights exactly as they were (a run whose limit always takes the adapter whole is
the run that merges the first task at 1 without measuring)."""

from __future__ import annotations

from math import inf, nan
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import groups

from pm_hf.config.checks import InputError
from pm_hf.config.groups import MergeArguments, RunConfig
from pm_hf.continual import build_loop
from pm_hf.heads.estimate import move_ratio
from pm_hf.method.strategies import build_strategy
from pm_hf.run.loop import ContinualLoop
from pm_hf.run.measure import alignment_of

VALIDATED = {"merge_method": "validated-alpha", "head_align": "prototypes", "head_align_drift": "sdc"}


def test_the_first_alpha_where_it_is_not_chosen():
    """The first task merges whole where the adapter moves its held-out features by at most
    `validation_first_move_limit` (5) times their spread, else at `validation_first_alpha` (0.5 unless set), on every
    key and without an accuracy estimate (there is none to read); with the limit null it reads no move either. What
    it measured is logged with the choice. Out of range, both knobs are refused by the input contract."""
    vector = SimpleNamespace(deltas={"a": torch.ones(2, 3), "b": torch.ones(4)})
    cases = (
        ({}, 4.9, 1.0),
        ({}, 5.0, 1.0),
        ({}, 5.1, 0.5),
        ({"validation_first_move_limit": 20}, 14.0, 1.0),
        ({"validation_first_alpha": 0.25}, 9.0, 0.25),
        ({"validation_first_move_limit": None}, None, 0.5),
        ({"validation_first_move_limit": None, "validation_first_alpha": 0}, None, 0.0),
    )
    for knobs, move, alpha in cases:
        measured = None if move is None else {"move": move, "rows": 29}
        first = SimpleNamespace(t=0, vector=vector, validation=None, feature_move=measured)
        plan = build_strategy(MergeArguments(**VALIDATED, merge_parameters=knobs or None)).merge(first)
        assert plan.alpha == {"a": alpha, "b": alpha}, (knobs, move)
        if move is not None:
            assert plan.calibration["first_move"] == measured and plan.calibration["alpha"] == alpha
    with pytest.raises(InputError, match=r"^validation_first_move_limit = 5.0: needs the first task's held-out data"):
        build_strategy(MergeArguments(**VALIDATED)).merge(SimpleNamespace(t=0, vector=vector, feature_move=None))
    bad = [("validation_first_alpha", 1.5), *(("validation_first_move_limit", v) for v in (0, -1, "5", nan, inf))]
    bad += [("validation_stop_se", v) for v in (0.5, nan, inf)]  # (the scan's margin: NaN was taken too)
    for name, value in bad:
        with pytest.raises(InputError, match=rf"^{name} = {value!r}: "):
            build_strategy(MergeArguments(**VALIDATED, merge_parameters={name: value}))


def test_move_ratio_by_hand():
    """Two points 2 apart (each 1 from their centre): a shift by (3, 4) moves each by 5, five times their spread; a
    swap of the two moves each by 2; no move is 0."""
    before = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert move_ratio(before, before + torch.tensor([3.0, 4.0])) == pytest.approx(5.0)
    assert move_ratio(before, before.flip(0)) == pytest.approx(2.0)
    assert move_ratio(before, before) == 0.0


def test_measuring_the_move_changes_nothing_else(model_dir, tmp_path):
    """A limit that always takes the adapter whole measures the move and then runs exactly as the rule without a
    limit at alpha_1 = 1: the same alphas, estimates, accuracies and class statistics through the second merge."""
    runs = {}
    for name, knobs in (("measured", {"validation_first_move_limit": 1e9}),
                        ("fixed", {"validation_first_move_limit": None, "validation_first_alpha": 1.0})):  # fmt: skip
        loop = build_loop(RunConfig(*groups(model_dir, tmp_path / name, **VALIDATED, merge_parameters=knobs)))
        runs[name] = (loop.run(stop_after=2), loop)
    (measured, loop), (fixed, other) = runs["measured"], runs["fixed"]
    assert measured["calibrations"][0]["first_move"]["move"] > 0 and fixed["calibrations"][0] is None
    assert measured["alphas"] == fixed["alphas"] and measured["alphas"][0] == 1.0
    assert measured["calibrations"][1:] == fixed["calibrations"][1:]
    assert measured["accuracy_matrix"] == fixed["accuracy_matrix"]
    stats, other_stats = alignment_of(loop).stats, alignment_of(other).stats
    assert all(torch.equal(stats[k], other_stats[k]) for k in stats)


def test_a_streamed_task_is_refused_under_the_knob_that_holds_out():
    """A training split that is streamed cannot give a held-out part: the loop's `prepare_task` refuses it naming the
    strategy's own knob (`validation_holdout` for validated-alpha, not the calibrations' `calibration_holdout`)."""
    strategy = build_strategy(MergeArguments(**VALIDATED))
    streamed = SimpleNamespace(train=datasets.Dataset.from_dict({"x": [1, 2, 3]}).to_iterable_dataset(), heldout=None)
    loop = SimpleNamespace(strategy=strategy, args=SimpleNamespace(seed=0))
    with pytest.raises(InputError, match=r"^validation_holdout = 0.1: needs a training split that is not streamed"):
        ContinualLoop.prepare_task(loop, 0, streamed)
