"""What a resume compares of the merge strategy's knobs (`merge_knobs` of the run record, as this pm_hf resolves
them): a knob that resolves otherwise, a default changed since, is a difference; so is a knob the record lacks (it
kept none, or the knob was added since) whose default may have differed then and that its config did not set."""

from pm_hf.config.groups import MergeArguments
from pm_hf.method.strategies import resolved_knobs
from pm_hf.run.rundir import config_differences

VALIDATED = MergeArguments(merge_method="validated-alpha", head_align="prototypes", head_align_drift="sdc")


def test_a_knob_whose_default_changed_is_a_difference_on_resume():
    now = {"merge_knobs": resolved_knobs(VALIDATED)}
    assert now["merge_knobs"]["validation_first_alpha"] == 0.5
    before = {"merge_knobs": {**now["merge_knobs"], "validation_first_alpha": 1.0}}
    assert config_differences(before, now) == [
        "merge knob validation_first_alpha (its default where not set): 1.0 -> 0.5"
    ]
    assert config_differences(before, now, training=False) == []  # a finished run evaluated or exported


def _record(parameters: dict | None, knobs: bool = True, **fields) -> dict:
    """A run record's merge part: its `MergeArguments` and, unless `knobs` is false (an older pm_hf), `merge_knobs`."""
    args = MergeArguments(**{**VALIDATED.__dict__, "merge_parameters": parameters, **fields})
    record = {"MergeArguments": {"merge_method": args.merge_method, "merge_parameters": parameters}}
    return {**record, "merge_knobs": resolved_knobs(args)} if knobs else record


def test_a_record_without_merge_knobs_differs_where_an_unset_knob_may_have_resolved_otherwise():
    params = {"validation_samples": 256}
    older, now = _record(params, knobs=False), _record(params)
    assert config_differences(older, now) == [
        "merge knob validation_features (not recorded by the pm_hf that saved the run): may have been 'exact' or "
        "'interpolated' -> 'interpolated'",
        "merge knob validation_first_alpha (not recorded by the pm_hf that saved the run): may have been 1.0 (the "
        "first task merged whole), or 0.5 (at commit 8e53af4) -> 0.5",
        "merge knob validation_first_move_limit (not recorded by the pm_hf that saved the run): may have been null "
        "(pm_hf 0.4.0 and older: the first task at validation_first_alpha always) -> 5.0",
        "merge knob validation_patience (not recorded by the pm_hf that saved the run): may have been 0 (the whole "
        "grid), 2 or 1 -> 1",
    ]
    assert config_differences(older, now, training=False) == []
    # set in the old config: compared as merge_parameters (here the same), nothing left to guess
    params = {**params, "validation_features": "exact", "validation_first_alpha": 1.0, "validation_patience": 2}
    params["validation_first_move_limit"] = None
    assert config_differences(_record(params, knobs=False), _record(params)) == []
    # set in the new config only: a difference of merge_parameters, and the knob's value named as this one resolves it
    diffs = config_differences(_record(None, knobs=False), _record({"validation_first_alpha": 1.0}))
    assert "merge_parameters: None -> {'validation_first_alpha': 1.0}" in diffs
    assert any(d.startswith("merge knob validation_first_alpha (") and d.endswith("-> 1.0") for d in diffs)
    # a strategy whose declared knobs kept their defaults: nothing to compare
    olora = {"merge_knobs": resolved_knobs(MergeArguments(merge_method="olora"))}
    assert olora["merge_knobs"] and config_differences({}, olora) == []


def test_a_knob_added_since_the_record_keeps_what_it_computed_at_its_default():
    now = _record({})
    added = {k: v for k, v in now["merge_knobs"].items() if k != "validation_log_eval"}  # (no `before`)
    assert config_differences({**now, "merge_knobs": added}, now) == []
    changed = {k: v for k, v in now["merge_knobs"].items() if k != "validation_first_alpha"}  # (a `before`)
    assert config_differences({**now, "merge_knobs": changed}, now) == [
        "merge knob validation_first_alpha (not recorded by the pm_hf that saved the run): may have been 1.0 (the "
        "first task merged whole), or 0.5 (at commit 8e53af4) -> 0.5",
    ]
    removed = {**now["merge_knobs"], "validation_gone": 1}  # a knob this pm_hf no longer has
    assert config_differences({**now, "merge_knobs": removed}, now) == [
        "merge knob validation_gone: 1 -> not a knob of this pm_hf's strategy"
    ]


def test_an_oracle_record_from_before_its_first_alpha_knob():
    """An oracle-alpha run saved before `oracle_first_alpha` existed (its `merge_knobs` empty) resumes at the
    default; setting the knob now is a change of `merge_parameters`, refused."""
    saved = {"MergeArguments": {"merge_method": "oracle-alpha", "merge_parameters": None}, "merge_knobs": {}}
    now = {**saved, "merge_knobs": resolved_knobs(MergeArguments(merge_method="oracle-alpha"))}
    assert now["merge_knobs"] == {"oracle_first_alpha": 1.0} and config_differences(saved, now) == []
    args = MergeArguments(merge_method="oracle-alpha", merge_parameters={"oracle_first_alpha": 0.5})
    set_now = {"MergeArguments": {"merge_method": "oracle-alpha", "merge_parameters": args.merge_parameters}}
    assert config_differences(saved, {**set_now, "merge_knobs": resolved_knobs(args)}) == [
        "merge_parameters: None -> {'oracle_first_alpha': 0.5}"
    ]
