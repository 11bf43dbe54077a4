"""Tests for pm_hf.commands.cli: YAML-then-flags parsing, error messages (before anything is written), help, committed
configs, the printed summary, and the `train`/`evaluate` wiring with a stand-in `pm_hf.continual` (no training)."""

from __future__ import annotations

import math
import re
import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from pm_hf.commands.cli import main
from pm_hf.commands.parsing import parse_config
from pm_hf.config.groups import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig
from pm_hf.errors import invalid
from pm_hf.run.results import format_evaluation, format_results

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
NAN = math.nan


def write_config(tmp_path: Path, text: str, out: str = "out") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"output_dir: {tmp_path / out}\nreport_to: none\n{text}", encoding="utf-8")
    return path


@pytest.fixture
def fake_continual(monkeypatch):
    """Stand-in for `pm_hf.continual` that records its calls, so `main` can run without training."""
    calls = {}

    def run_continual(*args, resume=False):
        calls["train"] = (args, resume)
        return {
            "tasks": ["a", "b"],
            "accuracy_matrix": [[0.9, None], [0.6, 0.8]],
            "acc": 0.7,
            "aaa": 0.8,
            "bwt": -0.3,
            "forgetting": 0.3,
            "alphas": [1.0, 0.4],
            "alphas_raw": [1.0, 0.4],
            "output_dir": "o",
        }

    def evaluate_run(run_dir):
        calls["evaluate"] = run_dir
        return {"last_row": [0.6, 0.8], "acc": 0.7}

    module = types.ModuleType("pm_hf.continual")
    module.run_continual = run_continual
    monkeypatch.setitem(sys.modules, "pm_hf.continual", module)
    runs = types.ModuleType("pm_hf.run.runs")
    runs.evaluate_run = evaluate_run
    monkeypatch.setitem(sys.modules, "pm_hf.run.runs", runs)
    monkeypatch.setattr("pm_hf.commands.cli.run_folder", lambda run_dir: calls.setdefault("checked", run_dir))
    return calls


def test_unknown_yaml_key_lists_close_names_and_writes_nothing(tmp_path, capsys, fake_continual):
    path = write_config(tmp_path, "perturb_epsilon: 0.3\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"^perturb_epsilon = 0.3: unknown field \(did you mean perturb_eps") as err:
        parse_config(path, [])
    assert "learning_rate" in str(err.value) and "pm-hf train --help" in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("pm-hf: error: perturb_epsilon = 0.3: unknown field") and "Traceback" not in stderr
    assert not (tmp_path / "out").exists() and "train" not in fake_continual


def test_unknown_cli_flag_lists_close_names(tmp_path, capsys, fake_continual):
    path = write_config(tmp_path, "")
    with pytest.raises(ValueError, match=r"^--perturb_epsilon = '0.3': unknown flag \(did you mean --perturb_eps"):
        parse_config(path, ["--perturb_epsilon", "0.3"])
    with pytest.raises(ValueError, match="every value follows its --<field> flag"):
        parse_config(path, ["stray"])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path), "--fisher_mod", "batch"])
    assert exit_info.value.code == 2 and "--fisher_mode" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and "train" not in fake_continual


@pytest.mark.parametrize(
    "text, match",
    [
        ("- perturb_eps: 0.5\n", "must be a flat YAML mapping"),
        ("just a string\n", "must be a flat YAML mapping"),
        ("r: 4\nr: 8\n", "^r = None: given twice"),
        ("r: [4\n", "not readable YAML"),
    ],
)
def test_malformed_yaml_fails_clearly(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        parse_config(path, ["--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="not found"):
        parse_config(tmp_path / "missing.yaml", [])


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("perturb_eps: 2\n", "perturb_eps", "2"),
        ("merge_method: foo\n", "merge_method", "'foo'"),
        ("scenario: bar\n", "scenario", "'bar'"),
        ("fisher_mode: exact\n", "fisher_mode", "'exact'"),
        ("perturb_probs: [0.5, 0.5, 0.5]\n", "perturb_probs", "[0.5, 0.5, 0.5]"),
        ("r: 0\n", "r", "0"),
        ("merge_method: ties\nties_density: 0\n", "ties_density", "0"),  # checked by the strategy that owns it
        ("merge_method: pm\nfixed_alpha: 1.5\n", "fixed_alpha", "1.5"),  # also when another strategy is chosen
        ("head_align: prototypes\nhead_align_lr: -1\n", "head_align_lr", "-1"),
        ("merge_method: fixed\n", "merge_method", "'fixed'"),  # retired: the same rule as coma
        ("lr_scheduler_kwargs: 5\n", "lr_scheduler_kwargs", "5"),  # a TypeError deep in the Trainer before
        ("accelerator_config: 5\n", "accelerator_config", "5"),  # read as a file descriptor before
    ],
)
def test_bad_value_names_field_and_value_before_writing(tmp_path, capsys, fake_continual, text, field, value):
    path = write_config(tmp_path, text)
    with pytest.raises(ValueError, match="^" + re.escape(f"{field} = {value}: ")):
        parse_config(path, [])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"pm-hf: error: {field} = {value}: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and "train" not in fake_continual


def test_bad_value_from_a_flag_is_reported_too(tmp_path):
    path = write_config(tmp_path, "")
    with pytest.raises(ValueError, match=r"^perturb_eps = 1\.5: "):
        parse_config(path, ["--perturb_eps", "1.5"])
    with pytest.raises(ValueError, match=r"^perturb_eps = 'abc': invalid float value: 'abc'"):
        parse_config(path, ["--perturb_eps", "abc"])


@pytest.mark.parametrize("source", ["yaml", "flag"])
def test_the_old_alpha_field_names_its_replacements(tmp_path, source):
    path = write_config(tmp_path, "merge_method: coma\n" + ("alpha: 0.5\n" if source == "yaml" else ""))
    flags = ["--alpha", "0.5"] if source == "flag" else []
    with pytest.raises(
        ValueError, match="^alpha = .*0.5.*: the field .* split: use `fixed_alpha` \\(coma\\).*`merge_scale`"
    ):
        parse_config(path, flags)


def test_output_dir_is_required(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("perturb_eps: 0.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="^output_dir = None: required"):
        parse_config(path, [])
    assert parse_config(path, ["--output_dir", str(tmp_path / "o")])[2].output_dir == str(tmp_path / "o")


def test_flags_override_yaml_and_types_are_converted(tmp_path):
    path = write_config(
        tmp_path,
        "perturb_eps: 0.5\nlearning_rate: 5e-3\nr: 4\ntarget_modules: [query, value]\nnum_tasks: 3\n"
        "data_files: {train: a.parquet, test: b.parquet}\nclass_groups: [[0, 1], [2]]\nalpha_clip: false\n",
    )
    parsed = parse_config(path, [])
    assert [type(p) for p in parsed] == [
        ModelArguments,
        DataArguments,
        PMConfig,
        LoraArguments,
        FisherArguments,
        MergeArguments,
    ]
    model, data, train, lora, fisher, merge = parsed
    assert train.learning_rate == 5e-3 and isinstance(train.learning_rate, float)  # YAML reads 5e-3 as a string
    assert train.perturb_eps == 0.5 and lora.r == 4 and lora.target_modules == ["query", "value"]
    assert data.data_files == {"train": "a.parquet", "test": "b.parquet"} and data.class_groups == [[0, 1], [2]]
    assert merge.alpha_clip is False and data.num_tasks == 3

    _, data, train, lora, fisher, merge = parse_config(
        path,
        [
            "--perturb_eps",
            "0.25",
            "--learning_rate",
            "0.1",
            "--perturb_probs",
            "0.25",
            "0.5",
            "0.25",
            "--data_files",
            "{train: x.parquet}",
            "--class_groups",
            "[[2], [0, 1]]",
            "--alpha_clip",
            "true",
            "--fisher-mode",
            "batch",
        ],
    )
    assert train.perturb_eps == 0.25 and train.learning_rate == 0.1 and train.perturb_probs == [0.25, 0.5, 0.25]
    assert data.data_files == {"train": "x.parquet"} and data.class_groups == [[2], [0, 1]]
    assert merge.alpha_clip is True and fisher.fisher_mode == "batch"
    assert lora.r == 4 and data.num_tasks == 3  # not overridden: the YAML value stays
    with pytest.raises(ValueError, match=re.escape("data_files = '[a.parquet]': give a mapping, e.g. '{train:")):
        parse_config(path, ["--data_files", "[a.parquet]"])
    with pytest.raises(ValueError, match=re.escape("task_datasets = '{a: 1}': give a list of mappings, e.g.")):
        parse_config(path, ["--task_datasets", "{a: 1}"])  # before: the example of class_groups
    with pytest.raises(ValueError, match=re.escape("class_groups = '[[0, 1]': not YAML/JSON (while parsing")):
        parse_config(path, ["--class_groups", "[[0, 1]"])  # before: `class_groups = None` and a cut reason
    with pytest.raises(ValueError, match=r"^use_rslora = 'maybe': use one of yes/no, .*1/0\.$"):
        parse_config(path, ["--use_rslora", "maybe"])  # before: `use_rslora = None` and '..'


def test_preset_fills_fields_that_the_file_and_flags_override(tmp_path):
    from pm_hf.config.presets import PRESETS, RECOMMENDED_PRESET

    assert RECOMMENDED_PRESET in PRESETS
    path = write_config(tmp_path, "preset: pm-proto\nperturb_eps: 0.25\n")
    *_, train, _, _, merge = parse_config(path, [])
    assert merge.head_align == "prototypes" and merge.head_align_drift == "sdc" and merge.merge_method == "pm"
    assert train.perturbation == "task_vector"
    assert train.perturb_eps == 0.25
    path = write_config(tmp_path, "preset: pm-proto\nhead_align: task\n")
    assert parse_config(path, [])[-1].head_align == "task"  # the file's own field wins over the preset
    assert parse_config(path, ["--head_align", "seen"])[-1].head_align == "seen"  # a flag wins over both
    assert parse_config(path, ["--preset", "pm"])[-1].head_align == "task"  # --preset replaces the file's preset
    plain = write_config(tmp_path, "merge_method: average\n")
    assert parse_config(plain, ["--preset", "pm"])[-1].merge_method == "average"
    assert parse_config(plain, ["--preset=pm-proto"])[-1].head_align == "prototypes"


def test_unknown_preset_names_the_valid_ones(tmp_path, capsys, fake_continual):
    path = write_config(tmp_path, "preset: pm-best\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert "preset" in err and "'pm-best'" in err and "pm-proto" in err
    assert "train" not in fake_continual and not (tmp_path / "out").exists()


def test_flags_alone_work_without_a_config(tmp_path):
    _, _, train, lora, _, _ = parse_config(None, ["--output_dir", str(tmp_path / "o"), "--r", "2"])
    assert lora.r == 2 and train.perturb_eps == 0.5


def test_train_help_lists_fields_with_help_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--config",
        "--resume",
        "perturb_eps",
        "Perturbation size eps",
        "fisher_mode",
        "--learning_rate",
        "merge_method",
        "PMConfig",
        "TrainingArguments (inherited)",
        "--data_files YAML",
    ):
        assert text in out, text


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_committed_configs_parse(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    # bf16 needs a GPU in TrainingArguments' own check; the paper configs ask for it on purpose.
    overrides = ["--bf16", "false"] if raw.get("bf16") and not torch.cuda.is_available() else []
    _, data, train, lora, _, merge = parse_config(path, overrides)
    assert train.output_dir == raw["output_dir"]
    if "task_datasets" in raw:  # one dataset per task (instruction streams)
        assert data.task_datasets == raw["task_datasets"]
    else:
        assert data.num_tasks == raw["num_tasks"]
    if path.name.startswith("paper_"):
        assert lora.r == 10 and lora.lora_alpha == 10 and lora.target_modules == ["k_proj", "v_proj"]
        assert train.learning_rate == 1e-3 and train.num_train_epochs == 10 and train.perturb_eps == 0.5
        assert train.per_device_train_batch_size * train.gradient_accumulation_steps == 256
        assert data.num_tasks == 10 and data.scenario == "class_incremental" and raw["bf16"] is True


def test_committed_configs_listed_in_readme():
    readme = (ROOT / "configs" / "README.md").read_text(encoding="utf-8")
    assert CONFIGS and all(f"`{p.name}`" in readme for p in CONFIGS)


def test_format_results_hand_made():
    results = {
        "tasks": ["act/animal", "artifact/attribute", "communication/location"],
        "accuracy_matrix": [[0.90, NAN, NAN], [0.95, 0.80, None], [0.50, 0.70, 0.90]],
        "acc": 0.70,
        "aaa": 0.825,
        "bwt": -0.25,
        "forgetting": 0.275,
        "alphas": [1.0, 0.4, 0.0],
        "alphas_raw": [1.0, 0.4, -0.125],
        "output_dir": "outputs/x",
    }
    text = format_results(results)
    lines = text.splitlines()
    assert "Accuracy matrix (%)" in lines[0] and "act/animal" in lines[1]
    row1 = next(line for line in lines if line.startswith("after task 1"))
    assert row1.split()[3:] == ["90.00", "-", "-"]  # NaN/None above the diagonal
    row3 = next(line for line in lines if line.startswith("after task 3"))
    assert row3.split()[3:] == ["50.00", "70.00", "90.00"]
    assert any(line.startswith("ACC") and "70.00" in line for line in lines)
    assert any(line.startswith("AAA") and "82.50" in line for line in lines)
    assert any(line.startswith("BWT") and "-25.00" in line for line in lines)
    assert any(line.startswith("Forgetting") and "27.50" in line for line in lines)
    alpha3 = next(line for line in lines if "communication/location" in line and "raw" in line)
    assert "0.0000" in alpha3 and "raw -0.1250" in alpha3
    assert lines[-1] == "Results written to outputs/x"
    # raw (non-fraction) scores and per-module alphas are shown as they are; missing keys are skipped
    text = format_results({"accuracy_matrix": [[12.5]], "acc": 12.5, "alphas": [{"l0.q": 0.5, "l0.v": 1.0}]})
    assert "12.5000" in text and "(%)" not in text and "2 modules, mean 0.7500" in text and "AAA" not in text


def test_train_and_evaluate_commands_call_continual(tmp_path, capsys, fake_continual):
    path = write_config(tmp_path, "perturb_eps: 0.5\n")
    assert main(["train", "--config", str(path), "--perturb_eps", "0.25", "--resume"]) == 0
    args, resume = fake_continual["train"]
    assert resume is True and args[2].perturb_eps == 0.25 and isinstance(args[5], MergeArguments)
    out = capsys.readouterr().out
    assert "after task 2" in out and "ACC" in out and "raw" in out

    assert main(["evaluate", str(tmp_path)]) == 0
    assert fake_continual["evaluate"] == str(tmp_path)
    assert "ACC (%)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
    assert "60.00" in format_evaluation({"last_row": [0.6], "acc": 0.6}, "run")


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["trian"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "did you mean train" in capsys.readouterr().err


def test_script_is_the_train_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_continual.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "train_continual.py"), run_name="__main__")
    assert exit_info.value.code == 0 and "usage: pm-hf train" in capsys.readouterr().out


def test_train_refuses_an_output_dir_that_is_a_file_before_loading(tmp_path, capsys, fake_continual):
    """Reported: `pm-hf train --output_dir FILE` ended in a FileExistsError traceback after loading the model."""
    blocker = tmp_path / "results.txt"
    blocker.write_text("mine")
    path = write_config(tmp_path, "")
    for out in (blocker, blocker / "run"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--config", str(path), "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert (
            exit_info.value.code == 2
            and err.startswith(f"pm-hf: error: {invalid('output_dir', str(out), '')}")  # (a long path is shortened)
            and "Traceback" not in err
        )
    assert "train" not in fake_continual and blocker.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "results.txt"]


def test_subcommand_options_are_never_abbreviated_and_required_ones_are_named(capsys):
    for argv, line in [
        (
            ["push", "run", "--hub_model_id", "me/m", "--privat"],
            "--privat = None: unknown option (did you mean --private?)",
        ),
        (["export", "run", "--output", "o", "--task", "1"], "--task = '1': unknown option"),
        (["export", "run"], "output = None: required: give --output"),
        (["merge", "--output", "o"], "adapters = None: required: give --adapters"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"pm-hf: error: {line}"), err


def test_train_refuses_a_resume_from_without_a_checkpoint_before_taking_the_folder(tmp_path, capsys, monkeypatch):
    """Reported: the check came under the run folder's lock, after the model was loaded, and left the lock file."""
    monkeypatch.chdir(ROOT)
    out, source = tmp_path / "out", tmp_path / "nowhere"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", "configs/ci_tiny.yaml", "--output_dir", str(out), "--resume_from", str(source)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"pm-hf: error: {invalid('resume_from', str(source), '')}holds")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["missing", "cut"])
def test_a_model_folder_without_whole_weights_is_an_input_error(model_dir, tmp_path, damage):
    """Weights missing from a model folder, or cut short: `model_name_or_path = ...`, not the loader's traceback."""
    import shutil

    from pm_hf.config.groups import ModelArguments
    from pm_hf.errors import InputError
    from pm_hf.method.models import load_model

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    weights = folder / "model.safetensors"
    weights.unlink() if damage == "missing" else weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match=r"^model_name_or_path = .*: its weights cannot be read \("):
        load_model(ModelArguments(model_name_or_path=str(folder)), "text", 4)


def test_evaluate_names_what_a_run_folder_and_a_local_folder_cannot_take(tmp_path, capsys):
    """A run folder with --config (it was told 'not a pm_hf export'), a local folder with --revision (ignored)."""
    (tmp_path / "latest.json").write_text("{}")
    for argv, message in (
        (["--config", "data.yaml"], "config = 'data.yaml': "),
        (["--revision", "task-1"], "revision = 'task-1': "),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", str(tmp_path), *argv])
        assert exit_info.value.code == 2 and capsys.readouterr().err.startswith(f"pm-hf: error: {message}")
