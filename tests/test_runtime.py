"""Long runs: a kill in the middle of a task resumes from the task's last Trainer checkpoint (`save_strategy`) to the
uninterrupted run's numbers, and one logging run per sequence (TensorBoard, offline): the step never goes back from
task to task, `eval/continual/*` are curves over tasks, the summary, matrix and alpha table are logged at the end."""

import json

import pytest
from conftest import groups
from safetensors import safe_open
from safetensors.torch import save_file
from test_continual import CrashAt, numbers

from pm_hf.continual import run_continual


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    return run_continual(*groups(model_dir, tmp_path_factory.mktemp("ref")))


def test_a_kill_in_the_middle_of_a_task_resumes_from_its_trainer_checkpoint(model_dir, tmp_path, reference):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed at step 3 of task 3, after its checkpoint at step 2
        run_continual(*groups(model_dir, out, save_strategy="steps", save_steps=2), callbacks=[CrashAt(3, step=3)])
    assert json.loads((out / "latest.json").read_text())["completed"] == 2
    saved = sorted(p.name for p in (out / "tasks" / "task_2").glob("checkpoint-*"))
    assert (
        saved == ["checkpoint-2"] and (out / "tasks" / "task_2" / "checkpoint-2" / "pm_hf_trainer.safetensors").exists()
    )
    steps = []

    class Steps(CrashAt):  # records the steps the resumed task trains
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    resumed = run_continual(*groups(model_dir, out, save_strategy="steps", save_steps=2), resume=True,
                            callbacks=[Steps(99)])  # fmt: skip
    assert steps[0] == 3  # task 3 continued after step 2, not from its start
    assert numbers(resumed) == numbers(reference)
    assert resumed["branch_counts"] == reference["branch_counts"]
    assert not (out / "tasks" / "task_2").exists()  # spent once the task's continual checkpoint is written


@pytest.mark.parametrize("damage", ["adapter values", "truncated state", "no sha256"])
def test_a_damaged_trainer_checkpoint_is_passed_over(model_dir, tmp_path, reference, caplog, damage):
    """A mid-task checkpoint whose files do not match the sha256 written last into it (a file changed or cut, or its
    save cut short before the sha256) is not resumed from: a warning names it, the task resumes from the checkpoint
    before it, and the run ends with the uninterrupted run's numbers."""
    out, saves = tmp_path / "run", {"save_strategy": "steps", "save_steps": 1}
    with pytest.raises(KeyboardInterrupt):  # killed at step 3 of task 3, after its checkpoints at steps 1 and 2
        run_continual(*groups(model_dir, out, **saves), callbacks=[CrashAt(3, step=3)])
    newest = out / "tasks" / "task_2" / "checkpoint-2"
    assert json.loads((newest / "pm_hf_sha256.json").read_text())["sha256"].keys() >= {"trainer_state.json"}
    if damage == "adapter values":
        with safe_open(str(newest / "adapter_model.safetensors"), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        key = next(iter(tensors))
        save_file({**tensors, key: tensors[key] + 0.25}, str(newest / "adapter_model.safetensors"), metadata=meta)
    elif damage == "truncated state":
        text = (newest / "trainer_state.json").read_text()
        (newest / "trainer_state.json").write_text(text[: len(text) // 2])
    else:
        (newest / "pm_hf_sha256.json").unlink()
    steps = []

    class Steps(CrashAt):  # records the steps the resumed task trains
        def on_step_end(self, args, state, control, **kw):
            steps.append(state.global_step)

    with caplog.at_level("WARNING", logger="pm_hf.method.trainer"):
        resumed = run_continual(*groups(model_dir, out, **saves), resume=True, callbacks=[Steps(99)])
    assert "checkpoint-2 is not used" in caplog.text and steps[0] == 2  # from checkpoint-1
    assert numbers(resumed) == numbers(reference) and resumed["branch_counts"] == reference["branch_counts"]


def test_one_tensorboard_run_for_the_whole_sequence(model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = run_continual(*groups(model_dir, tmp_path, report_to=["tensorboard"], logging_steps=1))
    events = EventAccumulator(str(tmp_path / "runs"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    losses = [e.step for e in events.Scalars("train/loss")]
    assert losses == sorted(losses) and len(set(losses)) == len(losses)  # the step never goes back
    per_task = [sum(counts.values()) for counts in results["branch_counts"]]
    assert losses[-1] == sum(per_task)
    alphas = events.Scalars("eval/continual/alpha")
    assert [round(e.value, 6) for e in alphas] == [round(a, 6) for a in results["alphas"]]
    assert [e.step for e in alphas] == [sum(per_task[: t + 1]) for t in range(3)]  # one point per task: a curve
    assert events.Scalars("eval/continual/acc")[0].value == pytest.approx(results["acc"])
    tags = events.Tags()["tensors"]
    assert any("continual/accuracy_matrix" in tag for tag in tags) and any("alpha_table" in tag for tag in tags)
    assert not list((tmp_path / "tasks").glob("*/runs"))  # no per-task run folders
    assert len(list((tmp_path / "runs").rglob("events.out.tfevents*"))) == 1  # one event file for the sequence
