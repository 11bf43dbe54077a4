"""`pm-hf check CONFIG`: train's validation, data included, without loading weights or writing anything; the plan it
prints (tasks, classes, samples, optimizer steps) against a computation from the data files and the Trainer's own
step count; bad configs refused by the error contract (exit 2, `pm-hf: error: <field> = ...`), nothing written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pm_hf.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ci_tiny.yaml"


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def _check(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(["check", *argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(out: str) -> list[tuple[int, int, int, int]]:
    """(classes, train, eval, steps) per task row of the printed plan."""
    row = r"^  (\d+)\s+(\d+) \[[^\]]*\]\s+(\d+)(?: \(\+\d+ held out\))?\s+(\d+)\s+(\d+)\s+task_"
    rows = re.findall(row, out, flags=re.M)
    return [tuple(int(v) for v in row[1:]) for row in rows]


def test_check_ci_tiny_prints_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(ROOT)
    loads = []  # no model weights are loaded
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", lambda *a, **k: loads.append(a))
    before = _files(ROOT)
    out = tmp_path / "run"
    code, printed, err = _check([str(CONFIG), "--output_dir", str(out)], capsys)
    assert code == 0, err
    assert not out.exists() and not any(tmp_path.iterdir())  # no output folder, lock or cache file
    assert not loads
    assert _files(ROOT) == before  # nothing beside the config either

    # the expected plan, computed from the data files as the config cuts them
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    labels = {s: np.asarray(pq.read_table(ROOT / f, columns=["label"])["label"].to_pylist())
              for s, f in config["data_files"].items()}  # fmt: skip
    groups = np.array_split(np.unique(labels["train"]), config["num_tasks"])
    caps = {"train": config["max_train_samples_per_class"], "test": config["max_eval_samples_per_class"]}
    count = lambda split, group: sum(min(int((labels[split] == c).sum()), caps[split]) for c in group)  # noqa: E731
    batch = config["per_device_train_batch_size"]
    expected = [
        (len(g), count("train", g), count("test", g), math.ceil(count("train", g) / batch) * config["num_train_epochs"])
        for g in groups
    ]
    assert _table(printed) == expected
    assert expected == [(5, 40, 20, 10), (5, 40, 20, 10)]  # the committed data, for the reader
    assert "task_0: act, animal, artifact, attribute, communication" in printed
    assert f"{sum(e[3] for e in expected)} steps in all" in printed
    assert "merge_method pm" in printed and "calibration none" in printed and "head align  none" in printed
    assert f"writes to   {out} (a new folder): after every task its checkpoint" in printed
    assert "the merged model in merged_adapter/" in printed and "reports to  none" in printed
    assert "not pushed" in printed


def test_check_reports_preset_alignment_calibration_and_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    flags = ["--preset", "pm-proto", "--alpha_calibration", "curve", "--calibration_holdout", "0.25"]
    flags += ["--push_to_hub", "true", "--hub_model_id", "someone/ci-tiny", "--gradient_accumulation_steps", "2"]
    code, printed, err = _check([str(CONFIG), "--output_dir", str(out), *flags], capsys)
    assert code == 0, err
    # 40 rows, a quarter held out for the calibration curve: 30 trained, 8 batches of 4, 4 steps of 2 batches
    assert _table(printed) == [(5, 30, 20, 4), (5, 30, 20, 4)]
    assert "30 (+10 held out)" in printed
    assert "(preset pm-proto)" in printed and "calibration curve (0.25" in printed
    assert "head align  prototypes, drift sdc" in printed
    assert "https://huggingface.co/someone/ci-tiny, after every task's merge" in printed
    assert not out.exists()


@pytest.mark.parametrize(
    ("samples", "batch", "accumulation", "epochs", "max_steps", "drop_last"),
    [(40, 4, 1, 1, -1, False), (40, 3, 3, 1.5, -1, False), (7, 2, 4, 3, -1, False), (41, 4, 2, 1, -1, True),
     (5, 8, 1, 2, -1, False), (40, 4, 1, 1, 7, False)],
)  # fmt: skip
def test_optimizer_steps_are_the_trainers(tmp_path, samples, batch, accumulation, epochs, max_steps, drop_last):
    """`pm_hf.commands.preflight.optimizer_steps` against the installed Trainer's own count on the same dataloader."""
    import torch
    from transformers import Trainer, TrainingArguments

    from pm_hf.commands.preflight import optimizer_steps

    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=batch, use_cpu=True,
                             gradient_accumulation_steps=accumulation, num_train_epochs=epochs, max_steps=max_steps,
                             dataloader_drop_last=drop_last, report_to="none")  # fmt: skip
    data = [{"x": torch.zeros(1), "labels": torch.zeros(1)} for _ in range(samples)]
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data)
    trainer_steps = trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]
    assert optimizer_steps(samples, args) == trainer_steps


def _write_parquet(path: Path, labels: list[int]) -> str:
    pq.write_table(pa.table({"text": [f"word {i}" for i in range(len(labels))], "label": labels}), path)
    return str(path)


def _bad_data(tmp_path: Path) -> dict[str, str]:
    """A test split holding class 4, which the training split lacks."""
    train = _write_parquet(tmp_path / "train.parquet", [0, 1, 2, 3] * 3)
    test = _write_parquet(tmp_path / "test.parquet", [0, 1, 2, 3, 4] * 2)
    return {"train": train, "test": test}


@pytest.mark.parametrize(
    ("case", "field"),
    [("missing data file", "data_files"), ("test class not in train", "eval_split"),
     ("bad learning rate", "learning_rate"), ("output_dir is a file", "output_dir"),
     ("output_dir under a file", "output_dir"), ("unknown field", "learnig_rate"),
     ("trainer evaluation", "eval_strategy"), ("label names", "label_names"), ("data file a folder", "data_files"),
     ("a CUDA device this machine lacks", "accumulator_device")],
)  # fmt: skip
def test_bad_configs_exit_2_naming_the_field_and_write_nothing(tmp_path, capsys, monkeypatch, case, field):
    monkeypatch.chdir(ROOT)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "run"
    flags = ["--output_dir", str(out)]
    if case == "missing data file":
        flags += ["--data_files", f"{{train: {inputs / 'nope.parquet'}, test: {inputs / 'nope.parquet'}}}"]
    elif case == "test class not in train":
        files = _bad_data(inputs)
        flags += ["--data_files", f"{{train: {files['train']}, test: {files['test']}}}", "--num_tasks", "2"]
    elif case == "bad learning rate":
        flags += ["--learning_rate", "-0.01"]
    elif case == "output_dir is a file":
        out = inputs / "a-file"
        out.write_text("not a folder")
        flags = ["--output_dir", str(out)]
    elif case == "output_dir under a file":
        (inputs / "a-file").write_text("not a folder")
        out = inputs / "a-file" / "run"
        flags = ["--output_dir", str(out)]
    elif case == "a CUDA device this machine lacks":  # before: an AssertionError after the first task trained
        flags += ["--accumulator_device", "cuda:99"]
    elif case == "data file a folder":  # before: 'no local dataset of that name', the path existing
        flags += ["--data_files", f"{{train: {inputs}, test: {inputs}}}"]
    elif case == "trainer evaluation":  # the task Trainers have no eval split: a ValueError once training began
        flags += ["--eval_strategy", "steps"]
    elif case == "label names":  # an IndexError after the first task trained, before
        flags += ["--label_names", "label"]
    else:
        flags += ["--learnig_rate", "0.01"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, printed, err = _check([str(CONFIG), *flags], capsys)
    assert code == 2 and not printed
    assert err.startswith(f"pm-hf: error: {field} = ") or err.startswith(f"pm-hf: error: --{field} = "), err
    assert err.count("\n") == 1  # one line, no traceback
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written or touched
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_a_run_is_refused_unless_resuming(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # a run's file (killed before its first checkpoint)
    code, _, err = _check([str(CONFIG), "--output_dir", str(out)], capsys)
    assert code == 2 and err.startswith("pm-hf: error: output_dir = ") and "--resume" in err
    code, printed, err = _check([str(CONFIG), "--output_dir", str(out), "--resume"], capsys)
    assert code == 0, err
    assert "continues the run there" in printed
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no lock taken, nothing added
    (out / "latest.json").write_text("{}")  # a damaged checkpoint pointer: --resume reads it, as train does
    code, _, err = _check([str(CONFIG), "--output_dir", str(out), "--resume"], capsys)
    assert code == 2 and "latest.json is not a checkpoint pointer (damaged)" in err


def test_check_takes_config_as_a_flag_and_requires_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, printed, _ = _check(["--config", str(CONFIG), "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 0 and "valid" in printed
    code, _, err = _check([], capsys)
    assert code == 2 and err.startswith("pm-hf: error: config = None: give the YAML config")


def test_check_an_instruction_config_loads_no_weights(llm_dir, tmp_path, capsys, monkeypatch):
    """A causal LM: the stream is built with its tokenizer, the model's weights are never loaded."""
    import json

    from conftest import INSTRUCT, TASKS
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(ROOT)
    loads = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    tasks = [{"dataset_name": "json", "data_files": {s: str(INSTRUCT / t / f"{s}.jsonl") for s in ("train", "test")}}
             for t in TASKS]  # fmt: skip
    out = tmp_path / "run"
    argv = [str(ROOT / "configs" / "llm_wordnet.yaml"), "--model_name_or_path", llm_dir, "--task_datasets",
            json.dumps(tasks), "--max_train_samples", "10", "--max_eval_samples", "4", "--output_dir", str(out),
            "--per_device_train_batch_size", "4"]  # fmt: skip
    code, printed, err = _check(argv, capsys)
    assert code == 0, err
    assert "(causal LM)" in printed and "instruction tasks: 2 tasks" in printed
    rows = re.findall(r"^  (\d+)\s+-\s+(\d+)\s+(\d+)\s+(\d+)\s+task_", printed, flags=re.M)
    assert [tuple(int(v) for v in r[1:]) for r in rows] == [(10, 4, 3), (10, 4, 3)]  # ceil(10 / 4) steps
    assert not loads and not out.exists()
    code, _, err = _check([*argv, "--head_align", "prototypes"], capsys)
    assert code == 2 and err.startswith("pm-hf: error: head_align = 'prototypes': a causal LM has no class head")


def test_train_refuses_an_output_dir_that_is_a_file_too(tmp_path, capsys, monkeypatch):
    """The output-folder check `check` runs is train's own (`rundir.check_claim`): a file in its place is an input
    error, not a traceback from the lock's mkdir."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(CONFIG), "--output_dir", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # the value is shortened when the path is long
    assert err.startswith("pm-hf: error: output_dir = '") and ": is a file, not a folder" in err
    assert out.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [out]


def test_a_run_trained_on_a_gpu_reads_back_on_a_machine_without_one():
    """The device fields are checked against this machine where a run starts (`check`, `train`), not where its
    settings are read back: evaluate and export of a run saved with CUDA devices work on a CPU."""
    from pm_hf.config.groups import FisherArguments, MergeArguments

    assert FisherArguments(fisher_device="cuda").fisher_device == "cuda"
    assert MergeArguments(accumulator_device="cuda:99").accumulator_device == "cuda:99"
