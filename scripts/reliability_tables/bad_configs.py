"""The bad-configs table of scripts/reliability.py: every case runs `pm-hf train` in this process; it passes when the
command exits 2 with one line `pm-hf: error: <field> = <value>: <fix>` naming the field the case expects, no
traceback, and nothing under the case's folder is created or changed."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from reliability_tables.common import _DROP, _tree, base_config, contract_error


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
    BadConfig(
        "push without a token", {"push_to_hub": True, "hub_model_id": "me/x", "hub_token": None}, expect="hub_token"
    ),
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
