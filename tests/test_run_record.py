"""What a resume compares of the merge strategy's knobs (`merge_knobs` of the run record, as this pm_hf resolves
them): a knob that resolves otherwise, a default changed since, is a difference; so is, in a record of a pm_hf that
kept no `merge_knobs`, a knob whose default may have differed then and that its config did not set."""

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


def test_a_record_without_merge_knobs_differs_where_an_unset_knob_may_have_resolved_otherwise():
    args = {"merge_parameters": {"validation_samples": 256}}
    older, now = {"MergeArguments": args}, {"MergeArguments": args, "merge_knobs": resolved_knobs(VALIDATED)}
    assert config_differences(older, now) == [
        "merge knob validation_features: the pm_hf that saved the run did not record it and resolved it as 'exact' or "
        "'interpolated', this one as 'interpolated'",
        "merge knob validation_first_alpha: the pm_hf that saved the run did not record it and resolved it as 1.0 (the "
        "first task merged whole), this one as 0.5",
        "merge knob validation_patience: the pm_hf that saved the run did not record it and resolved it as 1 or 2, "
        "this one as 1",
    ]
    assert config_differences(older, now, training=False) == []
    # set in its config: the values are compared as merge_parameters (here the same), nothing left to guess
    args["merge_parameters"].update(validation_features="exact", validation_first_alpha=1.0, validation_patience=2)
    assert config_differences(older, now) == []
    # a strategy whose declared knobs kept their defaults: nothing to compare
    olora = {"merge_knobs": resolved_knobs(MergeArguments(merge_method="olora"))}
    assert olora["merge_knobs"] and config_differences({}, olora) == []
