"""`ContinualTrainer` as a TRL user expects it: tasks as a `DatasetDict`, a dict of any split names or a list of rows;
a task without an eval split trained, merged and left unscored; `args` a `PMConfig` or a `TrainingArguments`
(taken as the PMConfig of the fields it sets, as TRL takes one); errors naming Python arguments;
`train()` returning a `TrainOutput`; `evaluate()`, `save_model()`, `push_to_hub()`, `add_callback()`,
`pop_callback()`, `remove_callback()`, `state`; the
continual metrics at `on_evaluate` and under eval/ in one TensorBoard event file."""

import json
import math

import datasets
import pandas as pd
import pytest
from conftest import DATA
from hub_standin import GOOD_TOKEN, FakeHub
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import TrainOutput

import pm_hf.hub.repository
from pm_hf import ContinualTrainer, PMConfig
from pm_hf.config.checks import InputError
from pm_hf.config.groups import DataArguments, FisherArguments, LoraArguments, MergeArguments
from pm_hf.data.streams import task_splits
from pm_hf.run.results import results_dict

WORDNET = {s: pd.read_parquet(DATA / f"{s}.parquet") for s in ("train", "test")}


def rows(split, *classes, n=16):
    frame = WORDNET[split]
    picked = pd.concat([frame[frame.label == c].head(n) for c in classes]).sort_index()
    return datasets.Dataset.from_pandas(picked[["text", "label"]], preserve_index=False)


def args(out, **kw):
    values = dict(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=2e-2,
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=3)  # fmt: skip
    return PMConfig(**{**values, **kw})


def trainer(model, out, tasks, **kw):
    lora, fisher = LoraArguments(r=4), FisherArguments(fisher_max_samples=24)
    return ContinualTrainer(model=model, args=args(out, **kw), tasks=tasks, lora_args=lora, fisher_args=fisher)


class Evaluations(TrainerCallback):
    def __init__(self):
        self.metrics, self.steps = [], []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics.append(dict(metrics))
        self.steps.append(state.global_step)


# ------------------------------------------------------------------------------------------ the tasks' forms
def test_a_task_may_be_a_datasetdict_any_split_names_or_rows():
    train, test = rows("train", 0, 1), rows("test", 0, 1)
    default = DataArguments()
    for eval_name in ("test", "validation", "eval"):  # while eval_split is left at 'test'
        got = task_splits(0, datasets.DatasetDict({"train": train, eval_name: test}), default)
        assert got["train"] is train and got["test"] is test
    named = DataArguments(train_split="fit", eval_split="dev")
    got = task_splits(3, {"fit": train, "dev": test, "classes": [0, 1]}, named)
    assert got["test"] is test and got["classes"] == [0, 1]
    as_rows = task_splits(1, [dict(r) for r in train], default)  # a list of rows: the training split alone
    assert as_rows["test"] is None and as_rows["train"]["text"] == train["text"]
    assert task_splits(1, train, default)["test"] is None
    listed = task_splits(1, {"train": [dict(r) for r in train], "validation": [dict(r) for r in test]}, default)
    assert listed["test"]["label"] == test["label"]


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"fit": "x"}, r"tasks\[2\]\['fit'\] = 'str': give a Dataset"),
        ({"test": [{"text": "a", "label": 0}]}, r"tasks\[2\] = \{'test': 1\}: has no 'train' split"),
        ({"train": [{"text": "a", "label": 0}], "dev": [{"text": "b", "label": 0}]}, r"none of its splits is an eval"),
        (42, r"tasks\[2\] = 'int': give a DatasetDict"),
    ],
)
def test_a_bad_task_is_named_by_its_index_and_splits_not_its_repr(entry, match):
    with pytest.raises(InputError, match=match) as err:
        task_splits(2, entry, DataArguments())
    assert "Dataset(" not in str(err.value)


def test_unscored_tasks_keep_the_summaries_of_the_scored_ones():
    log = [
        {"task": f"t{t}", "scores": {"accuracy": row}} for t, row in enumerate([[0.8], [0.6, None], [0.5, None, 0.9]])
    ]
    out = results_dict(log, [10, 0, 30], "accuracy", {}, "out")
    assert out["accuracy_matrix"] == [[0.8, None, None], [0.6, None, None], [0.5, None, 0.9]]
    assert out["unscored_tasks"] == ["t1"] and out["eval_sizes"] == [10, 0, 30]
    assert out["acc"] == pytest.approx((0.5 * 10 + 0.9 * 30) / 40)
    assert out["aaa"] == pytest.approx((0.8 + 0.6 + (0.5 * 10 + 0.9 * 30) / 40) / 3)
    assert out["bwt"] == pytest.approx(0.5 - 0.8) and out["forgetting"] == pytest.approx(0.8 - 0.5)
    nothing = results_dict(log[:2], [0, 0], "accuracy", {}, "out")  # no task scored yet: None, no crash
    assert nothing["acc"] is None and nothing["unscored_tasks"] == ["t0", "t1"]


# ------------------------------------------------------------------------------------------ arguments and errors
def test_training_arguments_are_taken_as_the_pmconfig_of_the_fields_they_set(tmp_path):
    given = TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=3e-3, num_train_epochs=2, seed=7,
                              lr_scheduler_type="cosine", use_cpu=True, report_to=[])  # fmt: skip
    trainer = ContinualTrainer("unused-model", given, tasks=[])
    args = trainer.args
    assert isinstance(args, PMConfig) and args.output_dir == str(tmp_path / "out")
    assert (args.learning_rate, args.num_train_epochs, args.seed, args.lr_scheduler_type.value) == (
        3e-3,
        2,
        7,
        "cosine",
    )
    assert args.hub_strategy == PMConfig(output_dir="x").hub_strategy  # PMConfig's own default, not 'every_save'
    assert args.perturbation == PMConfig(output_dir="x").perturbation
    with pytest.raises(InputError, match=r"^args\.hub_strategy = "):  # a value PMConfig does not take, named
        ContinualTrainer("unused-model", TrainingArguments(output_dir="o", hub_strategy="checkpoint"), tasks=[])
    with pytest.raises(InputError, match=r"^args = 'dict': give pm_hf's PMConfig"):
        ContinualTrainer("unused-model", {"output_dir": "o"}, tasks=[])
    assert not (tmp_path / "out").exists()


def test_errors_name_python_arguments(model_dir, tmp_path):
    task = {"train": rows("train", 0, 1), "test": rows("test", 0, 1)}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "latest.json").write_text("{}")  # a folder holding a run
    with pytest.raises(InputError) as err:
        trainer(model_dir, tmp_path / "old", [task]).train()
    message = str(err.value)
    assert message.startswith("args.output_dir = ") and "--" not in message
    assert "train(resume_from_checkpoint=True)" in message and "args.overwrite_output_dir=True" in message
    with pytest.raises(InputError, match=r"^args\.resume_from = .*holds no checkpoint"):
        trainer(model_dir, tmp_path / "new", [task], resume_from=str(tmp_path / "nowhere")).train()
    with pytest.raises(InputError, match=r"^tasks\[1\] = 'set'") as err:
        trainer(model_dir, tmp_path / "new2", [task, {1, 2}]).train()


@pytest.mark.parametrize(
    ("given", "match"),
    [({"lora_args": {"r": 4}}, r"^lora_args = 'dict': give a `LoraArguments`"),
     ({"compute_metrics": "accuracy"}, r"^compute_metrics = 'accuracy': give a function"),
     ({"callbacks": ["x"]}, r"^callbacks = 'str': give `ContinualCallback`s"),
     ({"processing_class": "bert-base-uncased"}, r"^processing_class = 'bert-base-uncased': give the tokenizer"),
     ({"eval_strategy": "steps"}, r"^args\.eval_strategy = 'steps': a task's Trainer has no eval split"),
     ({"label_names": ["x"]}, r"^args\.label_names = \['x'\]: "),
     ({"merge_args": "cuda:99"}, r"^merge_args\.accumulator_device = 'cuda:99': this machine has")],
)  # fmt: skip
def test_what_failed_after_training_began_is_refused_at_construction(model_dir, tmp_path, given, match):
    """Before: a TypeError / IndexError / AttributeError from inside the loop, some after the first task had trained
    and left a folder that refused a plain retry; now an input error before anything is written."""
    task = {"train": rows("train", 0, 1), "test": rows("test", 0, 1)}
    objects = {k: given.pop(k) for k in list(given) if k not in PMConfig.__dataclass_fields__}
    if "merge_args" in objects:  # a device this machine lacks (an AssertionError at the first merge, before)
        objects["merge_args"] = MergeArguments(accumulator_device=objects["merge_args"])
    with pytest.raises(InputError, match=match):
        ContinualTrainer(model_dir, PMConfig(output_dir=str(tmp_path / "out"), use_cpu=True, **given), [task],
                         **objects).train()  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_train_takes_its_own_folder_to_resume_and_a_count_of_tasks(model_dir, tmp_path):
    """Trainer's `resume_from_checkpoint` may be a path: here only the run's own folder (another one was ignored and
    output_dir's run resumed); `stop_after` a count >= 1 (0 and -1 wrote the lock and trained nothing)."""
    task = {"train": rows("train", 0, 1), "test": rows("test", 0, 1)}
    seq = trainer(model_dir, tmp_path / "out", [task])
    cases = [({"resume_from_checkpoint": str(tmp_path / "other")}, r"^resume_from_checkpoint = .*own folder"),
             ({"resume_from_checkpoint": "yes"}, r"^resume_from_checkpoint = 'yes': "),
             ({"stop_after": 0}, r"^stop_after = 0: "), ({"stop_after": "1"}, r"^stop_after = '1': ")]  # fmt: skip
    from pm_hf.run.inputs import resume_flag

    assert resume_flag(None, str(tmp_path / "out"), None) is False  # Trainer.train's default: no resume
    for kw, match in cases:
        with pytest.raises(InputError, match=match):
            seq.train(**kw)
    assert not (tmp_path / "out").exists()


class Begins(TrainerCallback):
    def __init__(self):
        self.begins = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.begins += 1


# ------------------------------------------------------------------------------------------ a run
@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """Two tasks — a DatasetDict with a 'validation' split, then a list of rows (no eval split) — with TensorBoard and
    a TrainerCallback added after construction."""
    out = tmp_path_factory.mktemp("run")
    first = datasets.DatasetDict(train=rows("train", 0, 1), validation=rows("test", 0, 1))
    second = [dict(r) for r in rows("train", 2, 3)]
    seq = trainer(model_dir, out, [first, second], report_to=["tensorboard"], logging_steps=1)
    seen = Evaluations()
    seq.add_callback(seen)
    popped, removed = Begins(), Begins()
    seq.add_callback(popped)
    seq.add_callback(removed)
    assert seq.pop_callback(popped) is popped and seq.pop_callback(Begins) is removed  # an instance, then a class
    assert seq.pop_callback(Begins) is None
    seq.add_callback(removed)
    seq.remove_callback(removed)
    output = seq.train()
    assert popped.begins == removed.begins == 0  # neither reached a task's Trainer
    return seq, output, seen, out


def test_train_returns_a_train_output_and_keeps_the_results(run):
    seq, output, _, out = run
    assert isinstance(output, TrainOutput) and output.global_step == 8  # 2 tasks x 32 rows / batch 8
    assert math.isfinite(output.training_loss) and output.metrics["train_loss"] == output.training_loss
    saved = json.loads((out / "results.json").read_text())
    assert output.results is seq.results and seq.results["accuracy_matrix"] == saved["accuracy_matrix"]
    assert output["accuracy_matrix"] == seq.results["accuracy_matrix"]  # as train() returned it before
    assert seq.state.global_step == 8 and any("loss" in entry for entry in seq.state.log_history)


def test_a_task_without_an_eval_split_is_trained_merged_and_unscored(run):
    seq, output, _, _ = run
    results = seq.results
    assert results["unscored_tasks"] == ["task_1: 2, 3"] and results["eval_sizes"] == [32, 0]
    assert results["accuracy_matrix"][1][1] is None and results["accuracy_matrix"][1][0] is not None
    assert results["alphas"][1] is not None and results["pre_merge_acc"][1] is None  # merged, not scored
    assert results["acc"] == results["accuracy_matrix"][1][0]  # the summaries over the scored task
    assert output.metrics["acc"] == results["acc"]


def test_continual_metrics_reach_on_evaluate_the_state_and_tensorboard_under_eval(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seq, _, seen, out = run
    assert [m["eval_continual/task"] for m in seen.metrics] == [0, 1] and seen.steps == [4, 8]
    assert seen.metrics[0]["eval_continual/acc_seen"] == seq.results["accuracy_matrix"][0][0]
    assert "eval_continual/pre_merge_acc" not in seen.metrics[1]  # the unscored task has none
    history = [e for e in seq.state.log_history if "eval_continual/alpha" in e]
    assert [e["step"] for e in history] == [4, 8] and history[1]["eval_continual/alpha"] == seq.results["alphas"][1]
    files = list((out / "runs").rglob("events.out.tfevents*"))
    assert len(files) == 1, files  # one event file for the run
    tags = EventAccumulator(str(files[0])).Reload().Tags()["scalars"]
    assert {"eval/continual/alpha", "eval/continual/acc_seen", "eval/continual/acc", "train/loss"} <= set(tags)
    assert not [tag for tag in tags if tag.startswith("train/continual")]


def test_evaluate_save_model_and_a_new_task(run, tmp_path):
    seq, _, seen, _ = run
    metrics = seq.evaluate()
    assert metrics["eval_accuracy"] == pytest.approx(seq.results["accuracy_matrix"][-1][0])
    assert metrics["eval_task_0_accuracy"] == metrics["eval_accuracy"] and "eval_task_1_accuracy" not in metrics
    assert seen.metrics[-1] == metrics and seq.state.log_history[-1]["eval_accuracy"] == metrics["eval_accuracy"]
    (tmp_path / "notes.txt").write_text("mine")
    for bad in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "export"):  # a file in its place or above it
        with pytest.raises(InputError, match=r"^output_dir = '.*: (is a file|lies under)"):  # (a long path shortened)
            seq.save_model(str(bad))
    with pytest.raises(InputError, match=r"^output_dir = .*holds other files \(\['notes.txt'\]\) that the export"):
        seq.save_model(str(tmp_path))  # a folder of the user's own files: never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    seq.save_model(str(tmp_path / "export"))
    seq.save_model(str(tmp_path / "export"))  # a previous export is replaced
    info = json.loads((tmp_path / "export" / "pm_hf_export.json").read_text())
    assert (tmp_path / "export" / "adapter_model.safetensors").is_file() and len(info["alphas"]) == 2
    output = seq.add_task({"train": rows("train", 4, 5), "eval": rows("test", 4, 5)}).train()
    assert output.global_step == 12 and len(seq.results["accuracy_matrix"]) == 3
    assert seq.evaluate()["eval_task_2_accuracy"] == seq.results["accuracy_matrix"][2][2]


def test_push_to_hub_pushes_the_merged_model(run, monkeypatch):
    seq, *_ = run
    fake = FakeHub()
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    monkeypatch.setattr(pm_hf.hub.repository, "get_token", lambda: None)
    oid = seq.push_to_hub(commit_message="my model", token=GOOD_TOKEN)
    (repo,) = fake.repos
    commit = fake.repos[repo]["commits"][oid]
    assert commit["message"] == "my model" and "adapter_model.safetensors" in commit["files"]
    assert json.loads(commit["files"]["results.json"])["tasks"] == seq.results["tasks"]


def test_a_causal_lm_task_given_as_rows_is_trained_merged_and_unscored(llm_dir, tmp_path):
    pairs = [{"prompt": f"word {i}", "response": f"answer {i % 7}"} for i in range(8)]
    tasks = [{"train": pairs, "validation": pairs[:4]}, pairs]  # rows per split; rows alone: no eval split
    lora, fisher = LoraArguments(r=2), FisherArguments(fisher_max_samples=4)
    seq = ContinualTrainer(
        llm_dir, args(tmp_path / "run", max_steps=2), tasks=tasks, lora_args=lora, fisher_args=fisher
    )
    output = seq.train()
    results = seq.results
    assert output.global_step == 4 and results["unscored_tasks"] == ["task_1: 1"] and results["eval_sizes"] == [4, 0]
    for name, matrix in results["score_matrices"].items():  # rougeL, exact_match, eval_loss: task 1 has no column
        assert matrix[1][1] is None and matrix[1][0] is not None, name
        assert results["score_summaries"][name]["final"] == pytest.approx(matrix[1][0]), name
    metrics = seq.evaluate()
    assert metrics["eval_loss"] == pytest.approx(results["score_matrices"]["eval_loss"][1][0])
    assert set(metrics) == {f"eval_{p}{n}" for p in ("", "task_0_") for n in ("rougeL", "exact_match", "loss")}
