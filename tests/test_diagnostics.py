"""A task that did not learn is said so: the chance and loss rules by hand, then a run whose loss cannot fall."""

import json

from conftest import groups

from pm_hf.continual import run_continual
from pm_hf.run.diagnostics import learning_warnings, loss_fell, near_chance, training_losses


def test_near_chance_is_a_quarter_of_the_way_from_chance_to_perfect():
    # 5 classes: chance 0.2, the line at 0.2 + 0.25 * 0.8 = 0.4; 2 classes: 0.5 + 0.25 * 0.5 = 0.625
    assert near_chance(0.28, 5) and near_chance(0.399, 5) and not near_chance(0.40, 5)
    assert near_chance(0.6, 2) and not near_chance(0.625, 2) and not near_chance(0.95, 2)


def test_the_loss_fell_when_its_last_logged_value_is_5_percent_under_its_first():
    assert loss_fell([2.0, 1.0]) and loss_fell([1.0, 1.2, 0.95])
    assert loss_fell([1.0, 0.96]) is False and loss_fell([1.0, 1.1]) is False
    assert loss_fell([1.0]) is None and loss_fell([]) is None


def test_training_losses_are_the_logged_ones_in_order():
    history = [{"loss": 2.0, "step": 1}, {"eval_loss": 9.0}, {"loss": 1.5, "step": 2}, {"train_runtime": 3.0}]
    assert training_losses(history) == [2.0, 1.5]


def test_the_warnings_name_the_task_and_its_figures():
    bad = learning_warnings("task_1: sst5", 0.24, 5, [1.61, 1.60])
    assert len(bad) == 1 and bad[0].startswith("task_1: sst5 did not learn")
    assert "24.0%" in bad[0] and "chance 20.0%" in bad[0] and "1.61 -> 1.6" in bad[0] and "learning rate" in bad[0]
    # a classifier that learned within the first logging window: its loss no longer falls, and nothing is said
    assert learning_warnings("task_3", 0.95, 2, [0.1942, 0.1852]) == []
    # a task without classes (instruction tuning) is judged by its loss
    flat = learning_warnings("task_0: define", None, 0, [2.5, 2.49])
    assert len(flat) == 1 and "did not fall (2.5 -> 2.49)" in flat[0]
    assert learning_warnings("task_0: define", None, 0, [2.5, 1.2]) == []
    assert learning_warnings("task_0: define", None, 0, [2.5]) == []  # one logged loss: nothing to compare


def test_a_run_reports_the_rule_applied_to_its_own_figures(model_dir, tmp_path):
    """A learning rate of 1e-12 and one full batch per epoch: every logged loss is the same number to float precision;
    results.json holds, per task, the within-task accuracy before the merge, the logged losses and the optimizer
    steps, and its warnings are exactly the rule applied to them."""
    out = tmp_path / "run"
    config = groups(model_dir, out, learning_rate=1e-12, num_train_epochs=2, logging_steps=1,
                    class_groups=[[0, 1], [2, 3]], max_train_samples_per_class=4)  # fmt: skip
    run_continual(*config)
    results = json.loads((out / "results.json").read_text())
    expected = []
    for t, name in enumerate(results["tasks"]):
        losses = results["train_losses"][t]
        assert len(losses) == 2 and abs(losses[0] - losses[1]) < 1e-4 * losses[0]
        assert 0.0 <= results["pre_merge_til_acc"][t] <= 1.0
        expected += learning_warnings(name, results["pre_merge_til_acc"][t], 2, losses)
    assert results["warnings"] == expected
    assert results["optimizer_steps"] == [2, 2]  # each task's own: 2 epochs of one batch (a loss logged at each)
