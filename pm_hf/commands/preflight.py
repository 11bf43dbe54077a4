"""`pm-hf check`: the validation `pm-hf train` does before it loads a model — the config, the launch, the output
folder, the strategy, and the data (every task's splits, columns and classes, as the run builds its stream) — and what
the run would do: its tasks, classes, training samples and optimizer steps, strategy, head alignment and where it
writes. Only the tokenizer or processor and the model's `AutoConfig` are loaded; nothing is written (the datasets
cache aside)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config.checks import check_devices_here, check_loop_training, invalid
from ..config.groups import RunConfig
from ..data.images import check_image_fit
from ..data.instruct import MODALITY
from ..distributed.launch import refuse_sharding
from ..heads.alignment import HeadAlignment
from ..hub.repository import check_hub_names, is_repo_id
from ..method.models import config_of, is_causal_lm, load_config, load_processor, model_digest, quantization_config
from ..method.strategies import build_strategy
from ..run.assembly import (
    check_before_loading,
    config_stream,
    merges_into_adapter,
    quiet_datasets,
    refuse_changed_resume,
)
from ..run.checkpoint import LATEST
from ..run.rundir import check_claim, holds_run
from .parsing import ParsedArgs, load_yaml_config, parse_config


@dataclass
class TaskPlan:
    name: str
    classes: list[int]  # global class ids (empty for an instruction task)
    train_samples: int  # the rows it trains on (after a strategy's held-out part)
    heldout: int  # rows held out for the strategy's probe (not trained on)
    eval_samples: int
    steps: int  # optimizer steps


@dataclass
class RunPlan:
    """What `pm-hf train` would do with a config (see `check_config`)."""

    config: str | None
    model: str
    kind: str  # "text classifier", "image classifier" or "causal LM"
    scenario: str
    num_classes: int
    tasks: list[TaskPlan]
    batch: dict[str, float]  # per_device, accumulation, processes, epochs or max_steps
    strategy: str
    preset: str | None
    calibration: str
    perturbation: str
    merges_into: str
    head_align: str
    output_dir: str
    output_state: str  # "new folder", "empty folder", ...
    hub: str | None
    reports: str = "none"  # the trackers (report_to)
    notes: list[str] = field(default_factory=list)


def _preset(config_path: str | None, overrides: Sequence[str]) -> str | None:
    """The preset a config runs with (`--preset` wins over the file's `preset`), for the report."""
    flags = list(overrides)
    for i, token in enumerate(flags):
        if token == "--preset" and i + 1 < len(flags):
            return flags[i + 1]
        if token.startswith("--preset="):
            return token.split("=", 1)[1]
    preset = load_yaml_config(config_path).get("preset") if config_path is not None else None
    return None if preset is None else str(preset)


def optimizer_steps(samples: int, args) -> int:
    """The optimizer steps of one task's `Trainer` on `samples` rows, as `Trainer.set_initial_training_values` counts
    them: batches per process (the sampler gives every process ceil(samples / processes) rows, floor with
    `dataloader_drop_last`), grouped by `gradient_accumulation_steps`, times the epochs; or `max_steps`."""
    if args.max_steps > 0:
        return int(args.max_steps)
    processes, batch = max(int(args.world_size), 1), int(args.per_device_train_batch_size)
    if args.dataloader_drop_last:
        batches = (samples // processes) // batch
    else:
        batches = math.ceil(math.ceil(samples / processes) / batch)
    accumulation = int(args.gradient_accumulation_steps)
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def heldout_rows(samples: int, fraction: float) -> int:
    """The rows `datasets.Dataset.train_test_split(test_size=fraction)` holds out of `samples` (`pm_hf.run.measure`)."""
    return math.ceil(fraction * samples) if fraction > 0 else 0


def _check_output(args, resume: bool) -> str:
    out = Path(args.output_dir)
    check_claim(out, resume, args.overwrite_output_dir)  # reading only, as `train` does before its lock
    if not out.exists():
        return "a new folder"
    if holds_run(out):
        return "continues the run there (--resume)" if resume else "replaces the run there (overwrite_output_dir)"
    return "an empty folder"


def _check_source(args) -> str | None:
    source = args.resume_from
    if not source:
        return None
    if is_repo_id(source):
        return f"starts from the continual state pushed to {source} (not downloaded by check)"
    if not (Path(source) / LATEST).is_file():
        raise invalid("resume_from", source, "holds no checkpoint (latest.json): give the output_dir of a run.")
    return f"starts from the last checkpoint of {source}"


def _hub(args) -> str | None:
    if not args.push_to_hub:
        return None
    check_hub_names(args)  # as train checks them before it asks the Hub anything
    name = args.hub_model_id or Path(args.output_dir).absolute().name
    repo = name if "/" in name else f"<your user>/{name}"
    when = "after every task's merge" if args.hub_strategy == "every_task" else "once at the end"
    branch = f", branch {args.hub_revision}" if args.hub_revision else ""
    return f"https://huggingface.co/{repo}{branch}, {when} (the token and access are checked by train, not here)"


def _calibration(strategy) -> str:
    calibration = getattr(strategy, "calibration", None)  # the closed form's (`pm_hf.method.strategies.calibration`)
    if calibration is None:
        return "none (the strategy has none)"
    if calibration.holdout:
        return f"{calibration.name} ({calibration.holdout:g} of each task's training data held out)"
    return calibration.name


def _head_align(merge_args, causal: bool) -> str:
    if causal or merge_args.head_align == "none":
        return "none"
    drift = f", drift {merge_args.head_align_drift}" if merge_args.head_align == "prototypes" else ""
    return (
        f"{merge_args.head_align}{drift} ({merge_args.head_align_steps} steps at lr {merge_args.head_align_lr:g}, "
        f"{merge_args.head_align_samples} samples) after every merge"
    )


def _quantized(model_args) -> bool:
    """Whether the base loads quantized: `load_in_4bit`/`load_in_8bit` (refused here where it cannot run), or a
    checkpoint saved quantized (its config's `quantization_config`)."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        quantization_config(model_args)
        return True
    return getattr(load_config(model_args), "quantization_config", None) is not None


def _check_stream(stream, processor, run: RunConfig, resume: bool) -> None:
    """What the task stream must fit, as `train` checks it before loading the model: the model's config (images given
    without a processor) and, with `--resume`, the saved run (its config, model files and data)."""
    if stream.modality == "image":
        check_image_fit(stream.tasks, processor, config_of(None, run.model_args), run.data_args.image_column)
    if resume:
        refuse_changed_resume(run, stream.tasks, model_digest(run.model_args))


def _check_settings(args, fisher_args, merge_args) -> None:
    """What `train` checks of the settings before it reads anything: the head alignment, the launch, the task
    Trainers' evaluation and label names, the devices this machine has."""
    HeadAlignment.check_args(merge_args)
    refuse_sharding(args)
    check_loop_training(args)
    check_devices_here(fisher_device=fisher_args.fisher_device, accumulator_device=merge_args.accumulator_device)


def check_config(config_path: str | os.PathLike | None, overrides: Sequence[str] = (), resume: bool = False) -> RunPlan:
    """Validate a `pm-hf train` config without loading model weights or writing anything, and plan the run.

    The checks are train's own: the config (`parse_config`), the strategy and head alignment, the launch
    (`refuse_sharding`), where resuming from another run starts, the output folder (`check_claim`, which `train` runs
    before taking its lock; here before the data, so a refused folder is reported at once), the model's config, the
    task stream (built with the tokenizer or processor as the run builds it: splits, columns, classes of every split),
    and what the stream's modality and the scenario allow of the strategy. What needs the weights (their shapes under
    ZeRO-3, a quantized base's layers) and the Hub (the token's write access) is checked by `train` only.

    Raises:
        InputError: the first problem, `<field> = <value>: <fix>`.
    """
    config = None if config_path is None else os.fspath(config_path)
    parsed: ParsedArgs = parse_config(config, overrides)
    model_args, data_args, args, lora_args, fisher_args, merge_args = parsed
    strategy = build_strategy(merge_args)
    _check_settings(args, fisher_args, merge_args)
    source = _check_source(args)
    output_state = _check_output(args, resume)
    causal = is_causal_lm(model_args)  # reads the model's config (AutoConfig), not its weights
    model_args = dataclasses.replace(model_args, model_task="causal_lm") if causal else model_args
    quantized = _quantized(model_args)
    processor = load_processor(model_args)
    with quiet_datasets():
        stream = config_stream(causal, data_args, processor, args, model_args.model_name_or_path)
    stream = strategy.transform_stream(stream)
    causal = stream.modality == MODALITY
    check_before_loading(strategy, causal, data_args, args, fisher_args, merge_args)
    _check_stream(stream, processor, RunConfig(model_args, data_args, args, lora_args, fisher_args, merge_args), resume)
    low_rank = merges_into_adapter(quantized, strategy, merge_args)

    kind = "causal LM" if causal else f"{stream.modality} classifier"
    merges_into = "a merged adapter (the base stays as loaded)" if low_rank else "the base weights"
    notes = [source] if source else []
    perturbation = args.perturbation
    if perturbation != "none":
        perturbation += f", eps {args.perturb_eps:g}"
    return RunPlan(
        config=config,
        model=model_args.model_name_or_path,
        kind=kind,
        scenario="instruction tasks" if causal else data_args.scenario,
        num_classes=stream.num_classes,
        tasks=_task_plans(stream, strategy, args),
        batch=_batch(args),
        strategy=strategy.name,
        preset=_preset(config, overrides),
        calibration=_calibration(strategy),
        perturbation=perturbation,
        merges_into=merges_into,
        head_align=_head_align(merge_args, causal),
        output_dir=str(Path(args.output_dir).absolute()),
        output_state=output_state,
        hub=_hub(args),
        reports=", ".join(args.report_to or []) or "none",
        notes=notes,
    )


def _task_plans(stream, strategy, args) -> list[TaskPlan]:
    """Each task's rows (trained, held out for the strategy's probe), eval rows and optimizer steps."""
    tasks = []
    for task in stream.tasks:
        rows = len(task.train)
        heldout = heldout_rows(rows, strategy.holdout)
        trained = rows - heldout
        steps = optimizer_steps(trained, args)
        tasks.append(TaskPlan(task.name, list(task.classes), trained, heldout, len(task.eval), steps))
    return tasks


def _batch(args) -> dict:
    """What one optimizer step takes, and how long the training of a task is."""
    batch = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
    }
    batch.update({"max_steps": args.max_steps} if args.max_steps > 0 else {"num_train_epochs": args.num_train_epochs})
    return batch


def _ids(classes: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for c in classes:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def format_plan(plan: RunPlan) -> str:
    """The report of `pm-hf check`."""
    b = plan.batch
    per_step = b["per_device_train_batch_size"] * b["gradient_accumulation_steps"] * b["processes"]
    length = f"max_steps {b['max_steps']}" if "max_steps" in b else f"{b['num_train_epochs']:g} epoch(s)"
    lines = [
        f"{plan.config or 'the flags'}: valid. Nothing was written; only the tokenizer/processor and the model's "
        "config were loaded.",
        f"model       {plan.model} ({plan.kind})",
        f"scenario    {plan.scenario}: {len(plan.tasks)} tasks"
        + ("" if plan.kind == "causal LM" else f", {plan.num_classes} classes (the head's size)"),
        "tasks",
    ]
    header = ("task", "classes", "train", "eval", "steps", "name")
    rows = [
        (str(t), "-" if not p.classes else f"{len(p.classes)} [{_ids(p.classes)}]",
         str(p.train_samples) + (f" (+{p.heldout} held out)" if p.heldout else ""), str(p.eval_samples), str(p.steps),
         p.name)
        for t, p in enumerate(plan.tasks)
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(row[:5], widths)) + "  " + row[5])
    lines += [
        f"  steps: {length}, {per_step} samples per optimizer step ({b['per_device_train_batch_size']} per device x "
        f"{b['gradient_accumulation_steps']} accumulation x {b['processes']} process(es)); "
        f"{sum(p.steps for p in plan.tasks)} steps in all",
        f"strategy    merge_method {plan.strategy}" + (f" (preset {plan.preset})" if plan.preset else "")
        + f"; calibration {plan.calibration}; perturbation {plan.perturbation}; merges into {plan.merges_into}",
        f"head align  {plan.head_align}",
        f"writes to   {plan.output_dir} ({plan.output_state}): after every task its checkpoint (latest.json -> "
        "checkpoint-task<t>), results.json and the plots; after the last, the merged model in merged_adapter/",
        f"reports to  {plan.reports}",
        f"hub         {plan.hub or 'not pushed (push_to_hub: false)'}",
    ]  # fmt: skip
    lines += [f"note        {n}" for n in plan.notes]
    return "\n".join(lines)
