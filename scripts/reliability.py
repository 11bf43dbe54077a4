"""Reliability of pm-hf runs, measured: bad configs and data must fail cleanly, killed runs must resume to identical
results, damaged checkpoints must be detected. Prints the counts; exit 1 if any case fails.

    python scripts/reliability.py                # every table, then the counts per door (train, check, evaluate,
                                                 # export, push, merge, api) and kind of case
    python scripts/reliability.py bad-configs    # or: faults, corruptions, doors, concurrency, export_faults, fuzz
    python scripts/reliability.py fuzz --quick   # a newer table's fast sample (the default test tier's)

- bad-configs: every case runs `pm-hf train` in this process; it passes when the command exits 2 with one line
  `pm-hf: error: <field> = <value>: <fix>` on stderr naming the field the case expects, no traceback, and nothing
  under the case's folder is created or changed (the output folder never created).
- faults: a run in a child process is killed with SIGKILL (or sees a full disk) at one point of the loop, then
  resumed in a second child; it passes when the first child ended by the fault itself (SIGKILL, or exit 3 on the full
  disk: any other exit is a failure) and results.json and the last checkpoint's tensors equal those of an
  uninterrupted run.
- corruptions: a copy of a finished 2-task run is damaged one way; it passes when `--resume` with one more task
  (the folder's next step) is refused by the contract (exit 2, one line `pm-hf: error: output_dir = ...`, no
  traceback) and no file of the folder changes; any other exit is a failure.
- doors, concurrency, export_faults, fuzz: the tables of scripts/reliability_tables/ (their docstrings say what a
  passing row is): bad inputs of every other door, concurrent use of one run folder or repository, SIGKILL and full
  disks in export, push, merge and Hub downloads, and Hypothesis-generated configs, flags and task inputs.
tests/test_reliability.py runs the first three tables (faults in-process, by exceptions instead of SIGKILL);
tests/test_doors.py, test_concurrency.py, test_export_faults.py and test_fuzz.py run each newer table's quick sample,
and the whole tables in the slow tier.
"""

# ruff: noqa: E402  (the offline switches must be set before transformers is imported)
from __future__ import annotations

import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import errno
import gzip
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # reliability_tables
WORDNET = ROOT / "data" / "wordnet_supersense10"


import reliability_tables
from reliability_tables.common import _DROP, ERROR_LINE, _tree, base_config, contract_error, make_assets  # noqa: F401


# ------------------------------------------------------------------------------------------- bad configs
@dataclass
class BadConfig:
    name: str
    fields: dict = field(default_factory=dict)  # YAML overrides (_DROP removes a field)
    flags: list = field(default_factory=list)
    data: dict | None = None  # name -> rows (train, test) of a data set written for the case
    model: str | None = None  # "missing", "no-config", "hub"
    out: str | None = None  # "file": output_dir is an existing file; "under-file": its parent is one
    expect: str = ""  # the field the error line must name: `pm-hf: error: <expect> = ...`

    def __post_init__(self):
        if not self.expect:
            raise ValueError(f"bad-config case {self.name!r}: state the field its error must name (expect=...)")


def _rows(labels: list[int]) -> list[tuple[str, int]]:
    return [(f"word{i} gloss text", c) for i, c in enumerate(labels)]


OK_LABELS = [c for c in range(6) for _ in range(4)]
BAD_CONFIGS = [
    # numbers that the Trainer would take on trust
    *[
        BadConfig(f"learning_rate={v}", {"learning_rate": v}, expect="learning_rate")
        for v in (-1, 0, float("nan"), float("inf"), "fast")
    ],
    *[
        BadConfig(f"num_train_epochs={v}", {"num_train_epochs": v}, expect="num_train_epochs")
        for v in (0, -1, float("nan"))
    ],
    BadConfig("max_steps=0", {"max_steps": 0}, expect="max_steps"),
    *[
        BadConfig(
            f"per_device_train_batch_size={v}", {"per_device_train_batch_size": v}, expect="per_device_train_batch_size"
        )
        for v in (0, -2, 2.5, "eight")
    ],
    BadConfig("per_device_eval_batch_size=0", {"per_device_eval_batch_size": 0}, expect="per_device_eval_batch_size"),
    *[
        BadConfig(
            f"gradient_accumulation_steps={v}", {"gradient_accumulation_steps": v}, expect="gradient_accumulation_steps"
        )
        for v in (0, 1.5)
    ],
    *[BadConfig(f"seed={v}", {"seed": v}, expect="seed") for v in (-3, 2.5, 2**40)],
    *[BadConfig(f"weight_decay={v}", {"weight_decay": v}, expect="weight_decay") for v in (-0.1, float("nan"))],
    *[BadConfig(f"max_grad_norm={v}", {"max_grad_norm": v}, expect="max_grad_norm") for v in (-1, float("inf"))],
    BadConfig("adam_beta1=1", {"adam_beta1": 1.0}, expect="adam_beta1"),
    BadConfig("adam_epsilon=0", {"adam_epsilon": 0}, expect="adam_epsilon"),
    BadConfig("warmup_steps=-1", {"warmup_steps": -1}, expect="warmup_steps"),
    BadConfig("logging_steps=0", {"logging_steps": 0}, expect="logging_steps"),
    BadConfig("label_smoothing_factor=1", {"label_smoothing_factor": 1.0}, expect="label_smoothing_factor"),
    BadConfig("lr_scheduler_type", {"lr_scheduler_type": "sawtooth"}, expect="lr_scheduler_type"),
    BadConfig("optim", {"optim": "sgdd"}, expect="optim"),
    BadConfig("save_strategy", {"save_strategy": "maybe"}, expect="save_strategy"),
    BadConfig("report_to unknown", {"report_to": "mlflowz"}, expect="report_to"),
    BadConfig("report_to not installed", {"report_to": "wandb"}, expect="report_to"),
    BadConfig("output_dir int", {"output_dir": 5}, expect="output_dir"),
    BadConfig("output_dir missing", {"output_dir": _DROP}, expect="output_dir"),
    BadConfig("output_dir a file", out="file", expect="output_dir"),
    BadConfig("output_dir under a file", out="under-file", expect="output_dir"),
    # perturbation
    *[
        BadConfig(f"perturb_eps={v}", {"perturb_eps": v}, expect="perturb_eps")
        for v in (1.0, -0.1, float("nan"), "half")
    ],
    *[
        BadConfig(f"perturb_probs={v}", {"perturb_probs": v}, expect="perturb_probs")
        for v in ([0.5, 0.5], [0.5, 0.5, 0.5], [-1, 1, 1])
    ],
    BadConfig("perturbation", {"perturbation": "noise"}, expect="perturbation"),
    *[
        BadConfig(f"head_learning_rate={v}", {"head_learning_rate": v}, expect="head_learning_rate")
        for v in (0, float("inf"))
    ],
    BadConfig("divergence_threshold=1", {"divergence_threshold": 1}, expect="divergence_threshold"),
    # LoRA
    *[BadConfig(f"r={v}", {"r": v}, expect="r") for v in (0, 2.5, True)],
    *[BadConfig(f"lora_alpha={v}", {"lora_alpha": v}, expect="lora_alpha") for v in (float("nan"), 0, -4)],
    *[BadConfig(f"lora_dropout={v}", {"lora_dropout": v}, expect="lora_dropout") for v in (1.0, -0.5)],
    BadConfig("target_modules str", {"target_modules": "query"}, expect="target_modules"),
    BadConfig("target_modules unknown", {"target_modules": ["nope_proj"]}, expect="target_modules"),
    BadConfig("modules_to_save unknown", {"modules_to_save": ["no_such_module"]}, expect="modules_to_save"),
    # Fisher
    *[BadConfig(f"fisher_max_samples={v}", {"fisher_max_samples": v}, expect="fisher_max_samples") for v in (0, 1.5)],
    BadConfig("fisher_batch_size=0", {"fisher_batch_size": 0}, expect="fisher_batch_size"),
    BadConfig("fisher_mode", {"fisher_mode": "exact"}, expect="fisher_mode"),
    BadConfig("fisher_labels", {"fisher_labels": "soft"}, expect="fisher_labels"),
    BadConfig("fisher_device", {"fisher_device": "gpu0"}, expect="fisher_device"),
    # merge strategies and their knobs
    BadConfig("merge_method unknown", {"merge_method": "best"}, expect="merge_method"),
    BadConfig("merge_method retired", {"merge_method": "fixed"}, expect="merge_method"),
    BadConfig("alpha renamed", {"alpha": 0.5}, expect="alpha"),
    BadConfig("--alpha renamed", flags=["--alpha", "0.5"], expect="alpha"),
    *[
        BadConfig(f"fixed_alpha={v}", {"merge_method": "coma", "fixed_alpha": v}, expect="fixed_alpha")
        for v in (1.5, float("nan"))
    ],
    BadConfig("cofima_weight=-1", {"merge_method": "cofima", "cofima_weight": -1}, expect="cofima_weight"),
    BadConfig("merge_scale=2", {"merge_method": "task-arithmetic", "merge_scale": 2}, expect="merge_scale"),
    BadConfig("ties_density=0", {"merge_method": "ties", "ties_density": 0}, expect="ties_density"),
    BadConfig("alpha_min=2", {"alpha_min": 2}, expect="alpha_min"),
    BadConfig("alpha_clip str", {"alpha_clip": "maybe"}, expect="alpha_clip"),
    BadConfig("alpha_granularity", {"alpha_granularity": "layer"}, expect="alpha_granularity"),
    *[
        BadConfig(f"oracle_grid={v}", {"merge_method": "oracle-alpha", "oracle_grid": v}, expect="oracle_grid")
        for v in ([float("nan")], [], [2])
    ],
    BadConfig("accumulator_device", {"accumulator_device": "gpu0"}, expect="accumulator_device"),
    BadConfig("head_align", {"head_align": "all"}, expect="head_align"),
    *[
        BadConfig(f"head_align_lr={v}", {"head_align": "prototypes", "head_align_lr": v}, expect="head_align_lr")
        for v in (float("inf"), 0)
    ],
    BadConfig("head_align_steps=0", {"head_align": "seen", "head_align_steps": 0}, expect="head_align_steps"),
    BadConfig(
        "head_align_samples=0", {"head_align": "prototypes", "head_align_samples": 0}, expect="head_align_samples"
    ),
    BadConfig("head_align_drift", {"head_align_drift": "yes"}, expect="head_align_drift"),
    BadConfig("alpha_calibration", {"alpha_calibration": "tangent"}, expect="alpha_calibration"),
    *[
        BadConfig(
            f"calibration_holdout={v}",
            {"alpha_calibration": "curve", "calibration_holdout": v},
            expect="calibration_holdout",
        )
        for v in (0, 0.9)
    ],
    BadConfig(
        "calibration_grid", {"alpha_calibration": "curve", "calibration_grid": [0.5, 2]}, expect="calibration_grid"
    ),
    BadConfig(
        "curve per module", {"alpha_calibration": "curve", "alpha_granularity": "module"}, expect="alpha_granularity"
    ),
    BadConfig("accumulator_dtype", {"accumulator_dtype": "float16"}, expect="accumulator_dtype"),
    BadConfig("fisher_point", {"fisher_point": "midway"}, expect="fisher_point"),
    BadConfig("fisher_classes", {"fisher_classes": "all"}, expect="fisher_classes"),
    BadConfig("merge_into", {"merge_into": "base"}, expect="merge_into"),
    BadConfig(
        "merged_adapter_rank=0", {"merge_into": "adapter", "merged_adapter_rank": 0}, expect="merged_adapter_rank"
    ),
    BadConfig(
        "merged adapter + oracle", {"merge_into": "adapter", "merge_method": "oracle-alpha"}, expect="merge_method"
    ),
    BadConfig("hub_strategy every_save", {"hub_strategy": "every_save"}, expect="hub_strategy"),
    BadConfig("push without a token", {"push_to_hub": True, "hub_model_id": "me/x"}, expect="hub_model_id"),
    BadConfig("fsdp", {"fsdp": "full_shard"}, expect="fsdp"),
    BadConfig("load_in_4bit and 8bit", {"load_in_4bit": True, "load_in_8bit": True}, expect="load_in_8bit"),
    BadConfig("load_in_4bit without a GPU", {"load_in_4bit": True}, expect="load_in_4bit"),
    BadConfig(
        "task vectors + domain_incremental",
        {"merge_method": "ties", "scenario": "domain_incremental", "task_datasets": "SAME_FILES_TWICE"},
        expect="merge_method",
    ),
    BadConfig("preset unknown", {"preset": "pm-best"}, expect="preset"),
    # model
    BadConfig("model_task", {"model_task": "regression"}, expect="model_task"),
    BadConfig("dtype", {"dtype": "float16"}, expect="dtype"),
    BadConfig("primary_metric", {"primary_metric": "bleu"}, expect="primary_metric"),
    BadConfig("max_new_tokens=0", {"max_new_tokens": 0}, expect="max_new_tokens"),
    BadConfig("model folder missing", model="missing", expect="model_name_or_path"),
    BadConfig("model folder without config.json", model="no-config", expect="model_name_or_path"),
    BadConfig("hub id offline", model="hub", expect="model_name_or_path"),
    BadConfig("image model on text", {"model_task": "image_classification"}, expect="model_name_or_path"),
    # the task stream
    BadConfig("scenario", {"scenario": "online"}, expect="scenario"),
    *[BadConfig(f"num_tasks={v}", {"class_groups": None, "num_tasks": v}, expect="num_tasks") for v in (0, 4, 2.5)],
    BadConfig("class_groups overlap", {"class_groups": [[0, 1], [1, 2]]}, expect="class_groups"),
    BadConfig("class_groups one class", {"class_groups": [[0, 1], [2]]}, expect="class_groups"),
    BadConfig("class_groups unknown ids", {"class_groups": [[0, 1], [7, 8]]}, expect="class_groups"),
    BadConfig("class_groups empty task", {"class_groups": [[0, 1], []]}, expect="class_groups"),
    BadConfig("class_groups flat", {"class_groups": [0, 1]}, expect="class_groups"),
    BadConfig("class_order_seed=-1", {"class_order_seed": -1}, expect="class_order_seed"),
    *[BadConfig(f"{k}=0", {k: 0}, expect=k) for k in ("max_train_samples_per_class", "max_eval_samples_per_class")],
    BadConfig("max_length=1", {"max_length": 1}, expect="max_length"),
    BadConfig("eval_split", {"eval_split": "validation"}, expect="eval_split"),
    BadConfig("train_split", {"train_split": "training"}, expect="train_split"),
    BadConfig("label_column", {"label_column": "y"}, expect="label_column"),
    BadConfig("text_column", {"text_column": "sentence"}, expect="text_column"),
    BadConfig("data_files list of dicts", {"data_files": [{"train": "a"}]}, expect="data_files"),
    BadConfig("data_files without spaces", flags=["--data_files", "{train:x,test:y}"], expect="data_files"),
    BadConfig(
        "data_files missing file",
        {"data_files": {"train": "nope/train.parquet", "test": "nope/test.parquet"}},
        expect="data_files",
    ),
    BadConfig(
        "dataset_name missing folder",
        {"dataset_name": "data/no_such_folder", "data_files": None},
        expect="dataset_name",
    ),
    BadConfig("task_datasets not a list", {"task_datasets": {"data_files": "x"}}, expect="task_datasets"),
    BadConfig("task_datasets unknown key", {"task_datasets": [{"split": "x"}]}, expect="task_datasets[0]"),
    BadConfig("empty train parquet", data={"train": [], "test": _rows(OK_LABELS)}, expect="data_files"),
    BadConfig("empty test parquet", data={"train": _rows(OK_LABELS), "test": []}, expect="data_files"),
    BadConfig("float labels", data={"train": "FLOAT_LABELS", "test": "FLOAT_LABELS"}, expect="label_column"),
    BadConfig(
        "label id 10^6", data={"train": _rows(OK_LABELS + [10**6]), "test": _rows(OK_LABELS)}, expect="label_column"
    ),
    BadConfig(
        "negative label", data={"train": _rows(OK_LABELS + [-1]), "test": _rows(OK_LABELS)}, expect="label_column"
    ),
    BadConfig(
        "class only in eval", data={"train": _rows(OK_LABELS), "test": _rows(OK_LABELS + [6])}, expect="eval_split"
    ),
    BadConfig(
        "class of a task missing in eval",
        data={"train": _rows(OK_LABELS), "test": _rows(OK_LABELS[:-4])},
        expect="class_groups",
    ),
    BadConfig(
        "splits with different columns", data={"train": _rows(OK_LABELS), "test": "OTHER_COLUMNS"}, expect="data_files"
    ),
    # the command line and the run folder
    BadConfig("unknown YAML key", {"lerning_rate": 0.1}, expect="lerning_rate"),
    BadConfig("unknown flag", flags=["--perturb_epsilon", "0.2"], expect="--perturb_epsilon"),
    BadConfig("stray argument", flags=["stray"], expect="arguments"),
    BadConfig("flag without value", flags=["--learning_rate"], expect="learning_rate"),
    BadConfig("bad flag value", flags=["--learning_rate", "nan"], expect="learning_rate"),
    BadConfig("bad flag type", flags=["--per_device_train_batch_size", "0.5"], expect="per_device_train_batch_size"),
    BadConfig("config not a mapping", fields={"__yaml__": "- a\n- b\n"}, expect="config"),
    BadConfig("config duplicate key", fields={"__yaml__": "r: 2\nr: 4\n"}, expect="r"),
    BadConfig("config not YAML", fields={"__yaml__": "r: [2\n"}, expect="config"),
    BadConfig("config file missing", fields={"__yaml__": None}, expect="config"),
]


def _write_case_data(case: BadConfig, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in case.data.items():
        path = folder / f"{split}.parquet"
        if rows == "FLOAT_LABELS":
            frame = pd.DataFrame({"text": ["a b", "c d"] * 6, "label": [0.5, 1.5] * 6})
        elif rows == "OTHER_COLUMNS":
            frame = pd.DataFrame({"sentence": ["a b"] * 24, "label": OK_LABELS})
        else:
            frame = pd.DataFrame(rows, columns=["text", "label"]).astype({"label": "int64"})
        frame.to_parquet(path)
        files[split] = str(path)
    return files


def _case_config(case: BadConfig, assets: dict, work: Path, out: Path) -> tuple[Path, list[str]]:
    """The YAML file and flags of one case."""
    path = work / "config.yaml"
    raw = case.fields.get("__yaml__", "") if "__yaml__" in case.fields else None
    if raw is not None or "__yaml__" in case.fields:
        if raw is None:
            return work / "missing.yaml", ["--output_dir", str(out), *case.flags]
        path.write_text(raw)
        return path, ["--output_dir", str(out), *case.flags]
    overrides = dict(case.fields)
    if case.data is not None:
        overrides["data_files"] = _write_case_data(case, work / "data")
    if overrides.get("task_datasets") == "SAME_FILES_TWICE":
        overrides["task_datasets"] = [{"data_files": assets["files"]}, {"data_files": assets["files"]}]
    if case.model == "missing":
        overrides["model_name_or_path"] = str(work / "no_such_model")
    elif case.model == "no-config":
        (work / "empty_model").mkdir()
        (work / "empty_model" / "weights.bin").write_bytes(b"x")
        overrides["model_name_or_path"] = str(work / "empty_model")
    elif case.model == "hub":
        overrides["model_name_or_path"] = "no-such-org/no-such-model"
    config = base_config(assets, out, **overrides)
    config = {k: v for k, v in config.items() if v is not None or k in ("class_groups", "data_files")}
    path.write_text(yaml.safe_dump(config))
    return path, list(case.flags)


def run_bad_config(case: BadConfig, assets: dict, work: Path) -> tuple[bool, str]:
    """Run one case through `pm-hf train`; (passed, the error line or what went wrong)."""
    from pm_hf.commands.cli import main

    work.mkdir(parents=True)
    out = work / "out"
    if case.out == "file":
        out.write_text("a file where the run folder should go\n")
    elif case.out == "under-file":
        (work / "blocker").write_text("a file where a folder above the run folder should go\n")
        out = work / "blocker" / "out"
    path, flags = _case_config(case, assets, work, out)
    before = _tree(work)
    stderr = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--config", str(path), *flags])
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:  # noqa: BLE001 - a traceback is exactly what the case reports
        return False, f"raised {type(err).__name__}: {err}"
    ok, line = contract_error(code, stderr.getvalue(), case.expect)
    if not ok:
        return False, line
    after = _tree(work)
    if after != before:
        return (
            False,
            f"written under {work}: {sorted(p for p in set(after) | set(before) if after.get(p) != before.get(p))}",
        )
    return True, line


# --------------------------------------------------------------------------------------------- corruptions
def _tamper(run: Path, name: str) -> None:
    """Damage a finished run folder one way (a checkpoint, its pointer or its manifest)."""
    import torch
    from safetensors.torch import load_file, save_file

    from pm_hf.fileio import file_digest

    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    state = ckpt / "state.safetensors"

    def rewrite(tensors: dict) -> None:  # a consistent-looking file with a manifest that matches it
        save_file(tensors, str(state))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["sha256"]["state.safetensors"] = file_digest([state])
        (ckpt / "manifest.json").write_text(json.dumps(manifest))

    tensors = load_file(str(state))
    key = next(k for k in tensors if k.startswith("weights/") and tensors[k].dim() == 2)
    if name == "truncated tensor file":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif name == "flipped byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))
    elif name == "NaN weight (manifest updated)":
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
        rewrite(tensors)
    elif name == "wrong shape (manifest updated)":
        tensors[key] = tensors[key][:1].clone()
        rewrite(tensors)
    elif name == "missing key (manifest updated)":
        rewrite({k: v for k, v in tensors.items() if k != key})
    elif name == "extra key (manifest updated)":
        rewrite({**tensors, "weights/not.a.parameter": torch.zeros(2)})
    elif name == "edited state.json":
        meta = json.loads((ckpt / "state.json").read_text())
        meta["completed"] = 1
        (ckpt / "state.json").write_text(json.dumps(meta))
    elif name == "edited log":
        log = json.loads(gzip.decompress((ckpt / "log.json.gz").read_bytes()))
        log[0]["alpha"] = 0.5
        (ckpt / "log.json.gz").write_bytes(gzip.compress(json.dumps(log).encode()))
    elif name == "log not gzip (manifest updated)":
        (ckpt / "log.json.gz").write_text("[]")
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["sha256"]["log.json.gz"] = file_digest([ckpt / "log.json.gz"])
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    elif name == "missing manifest":
        (ckpt / "manifest.json").unlink()
    elif name == "pointer escapes the folder":
        other = run.parent / f"{run.name}-elsewhere"
        shutil.copytree(ckpt, other / ckpt.name)
        (run / "latest.json").write_text(json.dumps({"checkpoint": f"../{other.name}/{ckpt.name}", "completed": 2}))
    elif name == "absolute pointer":
        (run / "latest.json").write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "completed": 2}))
    elif name == "missing pointer":
        (run / "latest.json").unlink()
    elif name == "pointer not JSON":
        (run / "latest.json").write_text("checkpoint-task2")
    else:
        raise ValueError(name)


CORRUPTIONS = {  # name -> the field its refusal must name (the run folder)
    name: "output_dir"
    for name in (
        "truncated tensor file", "flipped byte", "NaN weight (manifest updated)", "wrong shape (manifest updated)",
        "missing key (manifest updated)", "extra key (manifest updated)", "edited state.json", "edited log",
        "log not gzip (manifest updated)", "missing manifest",
        "pointer escapes the folder", "absolute pointer", "missing pointer", "pointer not JSON",
    )
}  # fmt: skip


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_corruption(name: str, finished: Path, assets: dict, work: Path) -> tuple[bool, str]:
    """Damage a copy of a finished 2-task run; resuming it with a third task must be refused, nothing changed."""
    from pm_hf.commands.cli import main

    run = work / "run"
    shutil.copytree(finished, run)
    _tamper(run, name)
    before = _snapshot(run)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, run)))
    stderr = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--config", str(config), "--resume"])
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:  # noqa: BLE001
        return False, f"raised {type(err).__name__}: {err}"
    changed = [p for p, data in _snapshot(run).items() if before.get(p) != data and not p.endswith(".lock")]
    if changed:
        return False, f"exit {code}, changed {changed[:3]}: {stderr.getvalue().strip()[-200:]}"
    return contract_error(code, stderr.getvalue(), CORRUPTIONS[name])  # exit 1 or a traceback is no refusal


def finished_run(assets: dict, out: Path) -> Path:
    """A finished 2-task run of the base config (the corruption tables damage copies of it)."""
    from pm_hf.commands.cli import main

    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, out, class_groups=[[0, 1], [2, 3]])))
    with contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--config", str(config)])
    return out


# ------------------------------------------------------------------------------------------- killed runs
FAULTS = [  # (name, the function whose call is the fault point, which call of it)
    ("training, task 0", "train", 1),
    ("training, task 2", "train", 3),
    ("Fisher, task 1", "fisher", 2),
    ("merge, task 1", "merge", 2),
    ("task record write, task 1", "record", 2),
    ("checkpoint write, task 1", "checkpoint", 2),
    ("before the pointer, task 2", "pointer", 3),
    ("before results.json, task 1", "results", 2),
    ("export", "export", 1),
    ("full disk at the checkpoint, task 1", "disk", 2),
]


def _fault_points():
    """(module, attribute) of every step a fault can hit."""
    import pm_hf.hub.export as export
    import pm_hf.run.checkpoint as checkpoint
    import pm_hf.run.loop as continual

    return [(continual.ContinualLoop, "trainer"), (continual, "estimate_fisher"), (continual, "merge_task"),
            (continual, "write_outputs"), (export, "save_file"), (export, "export_merged_adapter"),
            (checkpoint, "save_file"), (checkpoint, "atomic_write_text")]  # fmt: skip


@contextlib.contextmanager
def fault_points_restored():
    """Undo `install_fault` when the block ends (for in-process use)."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in _fault_points()]
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def install_fault(point: str, nth: int, die) -> None:
    """Make the nth call of the loop's step `point` end the process (`die()`), before or in the middle of it."""
    from transformers import TrainerCallback

    import pm_hf.hub.export as export
    import pm_hf.run.checkpoint as checkpoint
    import pm_hf.run.loop as continual

    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    def wrap(owner, name, partial=None, error=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if hit():
                if error is not None:
                    raise error
                if partial is not None:
                    partial(*args, **kwargs)
                die()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    class Kill(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.armed = hit()

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == 2:
                die()

    partial_file = lambda tensors, path, **kw: Path(path).write_bytes(b"partial")  # noqa: E731
    if point == "train":
        make = continual.ContinualLoop.trainer
        continual.ContinualLoop.trainer = lambda self, t, task: _with_callback(make(self, t, task), Kill())
    elif point in ("fisher", "merge", "results", "export"):
        names = {"fisher": "estimate_fisher", "merge": "merge_task", "results": "write_outputs"}
        wrap(export if point == "export" else continual, names.get(point, "export_merged_adapter"))
    elif point == "record":
        wrap(export, "save_file", partial=partial_file)
    elif point == "checkpoint":
        wrap(checkpoint, "save_file", partial=partial_file)
    elif point == "pointer":
        wrap(checkpoint, "atomic_write_text")
    elif point == "disk":
        wrap(checkpoint, "save_file", error=OSError(28, "No space left on device"))
    else:
        raise ValueError(point)


def _with_callback(trainer, callback):
    trainer.add_callback(callback)
    return trainer


def _child(config: str, point: str | None, nth: int, resume: bool) -> int:
    from pm_hf.commands.cli import main

    if point:
        install_fault(point, nth, lambda: os.kill(os.getpid(), signal.SIGKILL))
    argv = ["train", "--config", config] + (["--resume"] if resume else [])
    try:
        return main(argv)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return 3  # the full disk: the process ends with the error, state intact


def run_fault(name: str, point: str, nth: int, assets: dict, work: Path, reference: dict) -> tuple[bool, str]:
    """Kill a run at the fault point in a child process, resume it in another; compare with the reference."""
    work.mkdir(parents=True)
    out = work / "run"
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, out)))
    child = [sys.executable, __file__, "child", str(config)]
    first = subprocess.run([*child, "--point", point, "--nth", str(nth)], capture_output=True, text=True)
    struck, detail = fault_struck(point, first.returncode, first.stderr)
    if not struck:
        return False, detail
    second = subprocess.run([*child, "--resume"], capture_output=True, text=True)
    if second.returncode != 0:
        return False, f"resume failed: {second.stderr.strip()[-300:]}"
    return compare_with_reference(out, reference)


def fault_struck(point: str, code: int, stderr: str) -> tuple[bool, str]:
    """Whether the first child ended by the fault itself: SIGKILL, or exit 3 for the full disk (`_child`). Any other
    end (exit 1 with a traceback, an input error, a clean finish) is a failure of the case, not a fault survived."""
    expected = 3 if point == "disk" else -signal.SIGKILL
    if code == expected:
        return True, ""
    if code == 0:
        return False, "the fault did not happen"
    return False, f"the first run ended with exit {code}, not by the fault ({expected}): {stderr.strip()[-300:]}"


def run_outputs(out: Path) -> dict:
    from safetensors.torch import load_file

    results = json.loads((out / "results.json").read_text())
    ckpt = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    tensors = load_file(str(ckpt / "state.safetensors"))
    keys = ("accuracy_matrix", "til_accuracy_matrix", "alphas", "alphas_raw", "pre_merge_acc")
    return {"results": {k: results[k] for k in keys}, "tensors": tensors}


def compare_with_reference(out: Path, reference: dict) -> tuple[bool, str]:
    import torch

    got = run_outputs(out)
    if got["results"] != reference["results"]:
        return False, f"results differ: {got['results']['alphas']} vs {reference['results']['alphas']}"
    differ = [k for k, v in reference["tensors"].items() if not torch.equal(v, got["tensors"].get(k, torch.empty(0)))]
    if differ or set(got["tensors"]) != set(reference["tensors"]):
        return False, f"checkpoint tensors differ: {differ[:3]}"
    return True, "identical to the uninterrupted run"


# ------------------------------------------------------------------------------------------------- main
def _table(title: str, rows: list[tuple[str, bool, str]]) -> int:
    passed = sum(ok for _, ok, _ in rows)
    print(f"\n## {title}: {passed} / {len(rows)} passed")
    for name, ok, detail in rows:
        print(f"- [{'x' if ok else ' '}] {name}: {detail[:160]}")
    return len(rows) - passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", nargs="?", default="all", choices=["all", "bad-configs", "faults", "corruptions",
                                                                    "child", *reliability_tables.TABLES])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the fast sample of the newer tables (the default tier's)")
    parser.add_argument("config", nargs="?")
    parser.add_argument("--point")
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.table == "child":
        return _child(args.config, args.point, args.nth, args.resume)
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    failures, counts = 0, {}
    with tempfile.TemporaryDirectory(prefix="pm_hf_reliability_") as tmp:
        tmp = Path(tmp)
        assets = make_assets(tmp / "assets")
        if args.table in ("all", "bad-configs"):
            rows = [(c.name, *run_bad_config(c, assets, tmp / f"bad{i}")) for i, c in enumerate(BAD_CONFIGS)]
            failures += _table("bad configs: clean error, exit 2, nothing written", rows)
            _count(counts, "train", "bad inputs", rows)
        if args.table in ("all", "corruptions"):
            finished = finished_run(assets, tmp / "finished")
            rows = [(n, *run_corruption(n, finished, assets, tmp / f"corrupt{i}")) for i, n in enumerate(CORRUPTIONS)]
            failures += _table("corruptions: detected, refused, nothing changed", rows)
            _count(counts, "train", "bad inputs", rows)
        if args.table in ("all", "faults"):
            ref_out = tmp / "reference"
            config = tmp / "reference.yaml"
            config.write_text(yaml.safe_dump(base_config(assets, ref_out)))
            subprocess.run([sys.executable, __file__, "child", str(config)], check=True, capture_output=True)
            reference = run_outputs(ref_out)
            rows = [
                (n, *run_fault(n, p, k, assets, tmp / f"fault{i}", reference)) for i, (n, p, k) in enumerate(FAULTS)
            ]
            failures += _table("faults: killed, resumed, identical results", rows)
            _count(counts, "train", "faults", rows)
        failures += _more_tables(args.table, tmp, args.quick, counts)
    return 1 if failures else 0


def _count(counts: dict, door: str, kind: str, rows: list) -> None:
    """Add a table's rows (name, ok, detail) to the per-door counts: [tried, passed]."""
    count = counts.setdefault((door, kind), [0, 0])
    count[0] += len(rows)
    count[1] += sum(bool(row[1]) for row in rows)


def _more_tables(which: str, tmp: Path, quick: bool, counts: dict) -> int:
    """The tables of scripts/reliability_tables/ (every door), then the count per door and kind of every table run."""
    import importlib

    failures = 0
    for name in reliability_tables.TABLES:
        if which not in ("all", name):
            continue
        table = importlib.import_module(f"reliability_tables.{name}")
        rows = table.rows(tmp / name, quick)
        failures += _table(
            f"{name}: {table.TITLE}", [(f"{door}: {case}", ok, detail) for door, case, ok, detail in rows]
        )
        cases = getattr(table, "case_counts", lambda row: (1, int(bool(row[2]))))  # a row may sum many cases
        for row in rows:
            tried, passed = cases(row)
            count = counts.setdefault((row[0], table.KIND), [0, 0])
            count[0], count[1] = count[0] + tried, count[1] + passed
    if counts:
        print(door_summary(counts))
    return failures


KINDS = {
    "bad inputs": "clean",
    "faults": "survived or refused",
    "concurrency": "consistent",
    "fuzzed": "by the contract",
}


def door_summary(counts: dict[tuple[str, str], list[int]]) -> str:
    """A markdown table: one row per door, `passed / tried` per kind of case."""
    doors = sorted({door for door, _ in counts}, key=lambda d: (DOORS.index(d) if d in DOORS else len(DOORS), d))
    head = "| door | " + " | ".join(f"{kind} (tried / {what})" for kind, what in KINDS.items()) + " |"
    lines = ["", "## per door", head, "|---" * (len(KINDS) + 1) + "|"]
    for door in doors:
        cells = [
            f"{counts[door, kind][0]} / {counts[door, kind][1]}" if (door, kind) in counts else "-" for kind in KINDS
        ]
        lines.append(f"| {door} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOORS = ["train", "check", "evaluate", "export", "push", "merge", "api"]


if __name__ == "__main__":
    sys.exit(main())
