"""Post-hoc merge (`pm-hf merge`): combine LoRA adapters already trained from one base model, in order, with any
merge strategy, into a self-describing export folder with its card. Nothing is written outside that folder.

With a data config (one task per adapter, in order), the continual loop runs with each task's training replaced by
loading its adapter, so everything else is the loop's own: the head's handling, the Fisher at theta*_t on the task's
data, the merge, the evaluation of every seen task, results.json and the export; its run folder is a temporary one
next to the output, removed at the end (the config's `output_dir` is not used). Adapters trained by a pm_hf run
(`pm-hf export RUN --mode per-task`) merged this way with the run's config give the run's merged model. Without
data, the data-free strategies merge the LoRA weights, and the modules the adapters train in full (PEFT's
`modules_to_save`, e.g. the head of a SEQ_CLS adapter made by plain PEFT) by `HEAD_RULE`: their plain average.
Strategies that need a Fisher or a score need the config. The inputs are checked first (`pm_hf.hub.posthoc_inputs`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoTokenizer, TrainerState

from ..config.checks import check_devices_here, invalid
from ..config.groups import LoraArguments, MergeArguments, RunConfig
from ..distributed.launch import refuse_any_launch_mode
from ..fileio import alive
from ..hub.card_text import HEAD_RULE
from ..hub.export import ExportSpec, dense_record, task_record, write_export
from ..hub.origin import resolve_base
from ..hub.posthoc_inputs import (
    adapter_configs,
    adapter_modules,
    average_modules,
    check_fit,
    head_labels,
    lora_weight_shapes,
    model_shapes,
    same_model,
)
from ..hub.repository import HUB_ERRORS
from ..method.adapters import load_adapter_weights
from ..method.models import hub_kwargs
from ..method.strategies import build_strategy, merge_task
from ..method.weights import ModelWeights
from .assembly import build_loop
from .checkpoint import seeded
from .inputs import destination
from .loop import ContinualLoop
from .run_export import export_run
from .runs import MODEL_CLASSES

PEFT_TASKS = {"SEQ_CLS": "sequence_classification", "CAUSAL_LM": "causal_lm", None: "image_classification"}


class LoadedAdapter:
    """Stands in for a task's trainer: `train()` loads the task's saved adapter into the model instead."""

    def __init__(self, model, source: str):
        self.model, self.source, self.branch_counts = model, source, {}
        self.state = TrainerState()  # nothing trained here: no training loss logged

    def train(self, resume_from_checkpoint=None) -> None:
        load_adapter_weights(self.model, self.source)

    def log(self, logs: dict) -> None:
        pass


class PosthocLoop(ContinualLoop):
    """The continual loop with task t's training replaced by loading `adapters[t]`; `output` is the export folder,
    which results.json names (the run folder is a temporary one)."""

    def __init__(self, *parts, adapters: Sequence[str] = (), output: str | None = None, **options):
        super().__init__(*parts, **options)
        self.adapters, self.output = list(adapters), output

    def trainer(self, t: int, task) -> LoadedAdapter:
        return LoadedAdapter(self.model, self.adapters[t])

    def results(self) -> dict:
        out = super().results()
        if self.output is not None:
            config = out.get("config", {})
            training = {**config.get("PMConfig", {}), "output_dir": self.output}
            out.update(output_dir=self.output, config={**config, "PMConfig": training})
        return out


def lora_arguments(config: LoraConfig) -> LoraArguments:
    targets = config.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else [targets]
    return LoraArguments(r=config.r, lora_alpha=config.lora_alpha, target_modules=targets, use_rslora=config.use_rslora)


def merge_adapters(adapters: Sequence[str], output: str | Path, merge_args: MergeArguments | None = None,
                   parsed: tuple | None = None) -> dict:  # fmt: skip
    """Merge `adapters` (in order) into one export folder at `output`.

    Args:
        adapters: PEFT LoRA adapters (folders or Hub ids) trained from the same base model.
        output: the export folder to write (`pm_hf.hub.export.write_export`: adapter, card, pm_hf_export.json).
        merge_args: the strategy and its knobs (default: the config's with `parsed`; without it, give a data-free
            strategy such as `MergeArguments(merge_method="ties")`: the default `pm` needs each task's data).
        parsed: the `RunConfig` of a data config with one task per adapter (or its six argument groups, as
            `pm_hf.commands.parsing.parse_config` gives them); its `output_dir` is not used: the loop runs in a
            temporary folder next to `output`, removed at the end (results.json and the plots are written into the
            export).

    Returns:
        What the export's pm_hf_export.json records (alpha per task, strategy, ...).
    """
    if isinstance(adapters, (str, Path)):
        raise invalid("adapters", str(adapters), "give a list of adapter folders or Hub ids, in task order.")
    destination(str(output))  # never a file, nor a folder of other files: the export replaces what it finds
    config, modules = adapter_configs(adapters)[0], adapter_modules(adapters)
    if parsed is not None:
        return _merge_with_data(adapters, config, modules, Path(output), RunConfig.of(parsed), merge_args)
    return _merge_data_free(adapters, config, modules, Path(output), merge_args or MergeArguments())


def _merge_with_data(adapters, config, modules, output: Path, run_config: RunConfig, merge_args) -> dict:
    model_args, args = run_config.model_args, run_config.training_args
    merge_args = merge_args or run_config.merge_args
    base = resolve_base(adapters[0], config.base_model_name_or_path)
    if not same_model(model_args.model_name_or_path, base):
        fix = f"the adapters were trained from {base!r}: give that model in the config."
        raise invalid("model_name_or_path", model_args.model_name_or_path, fix)
    fix = "`pm-hf merge` loads saved adapters and trains nothing: run it as one process, without DeepSpeed or FSDP."
    refuse_any_launch_mode(args, fix)  # nothing to train (ZeRO-3 could not even load it)
    devices = {
        "fisher_device": run_config.fisher_args.fisher_device,
        "accumulator_device": merge_args.accumulator_device,
    }
    check_devices_here(**devices)
    remove_dead_runs(output)
    run = Path(tempfile.mkdtemp(prefix=f".{output.name}.run-{os.getpid()}-", dir=_parent(output)))
    args.output_dir = str(run)  # the loop's run folder: temporary, next to the output (room for its checkpoint)
    try:
        run_config = run_config.replace(lora_args=lora_arguments(config), merge_args=merge_args)
        loop_class = functools.partial(PosthocLoop, adapters=adapters, output=str(output))
        check = functools.partial(_check_stream, adapters, config, modules[0], model_args)
        loop = build_loop(run_config, loop_class=loop_class, check_stream=check)
        _check_model(adapters[0], config, modules[0], model_shapes(loop.model), "the config's model")
        loop.run()
        return export_run(loop, output, info={"merged_adapters": list(adapters)})
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _check_stream(adapters, config: LoraConfig, modules: dict, model_args, stream, run=None) -> None:
    """Before the config's model is loaded: one task per adapter, and the model as the loop would load it (on the
    meta device, from its config, with a head of the stream's classes) holds every weight the adapters change."""
    if len(stream.tasks) != len(adapters):
        fix = f"the config has {len(stream.tasks)} tasks for {len(adapters)} adapters: give one per adapter."
        raise invalid("adapters", list(adapters), fix)
    task = PEFT_TASKS.get(config.task_type, "causal_lm")
    try:
        model_config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs(model_args))
    except (*HUB_ERRORS, TypeError, ValueError):
        return  # a model its config cannot describe: checked once loaded
    if task != "causal_lm":
        model_config.num_labels = stream.num_classes
    _check_model(adapters[0], config, modules, model_shapes(_on_meta(task, model_config)), "the config's model")


def remove_dead_runs(output: Path) -> list[str]:
    """Remove the temporary run folders (`.<name>.run-<pid>-*`) that merges into `output` killed before their end
    left beside it; those of live merges stay. Returns their names."""
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.run-(\d+)-")
    parent = output.resolve().parent
    if not parent.is_dir():
        return []
    dead = [p for p in parent.iterdir() if (m := pattern.match(p.name)) and not alive(int(m.group(1)))]
    for path in dead:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in dead]


def _parent(output: Path) -> Path:
    """The output's folder, made if missing (a checked merge writes the output there)."""
    output.resolve().parent.mkdir(parents=True, exist_ok=True)
    return output.resolve().parent


def _merge_data_free(adapters, config, modules, output: Path, merge_args: MergeArguments) -> dict:
    strategy = build_strategy(merge_args)
    if strategy.needs_fisher or strategy.needs_score or strategy.needs_probe or strategy.needs_validation:
        fix = "needs each adapter's task data: give a data config with one task per adapter (--config)."
        raise invalid("merge_method", merge_args.merge_method, fix)
    task = PEFT_TASKS.get(config.task_type, "causal_lm")
    base = resolve_base(adapters[0], config.base_model_name_or_path)
    pristine = _load_base(adapters[0], config, base, task, modules[0])
    history, alphas = _merge_lora(pristine, config, adapters, strategy)
    names = [str(a) for a in adapters]
    results = {"tasks": names, "alphas": [a for a, _ in alphas], "alphas_raw": [raw for _, raw in alphas],
               "accuracy_matrix": [], "config": {"MergeArguments": dataclasses.asdict(merge_args)}}  # fmt: skip
    info = {"merge_method": strategy.name, "tasks": names, "alphas": results["alphas"], "merged_adapters": names}
    if modules[0]:
        info.update(modules_to_save=list(config.modules_to_save or []), head_rule=HEAD_RULE)
    save = list(config.modules_to_save or []) if modules[0] else []
    spec = ExportSpec(base, config.revision, task, save, _tokenizer(base, config.revision), info)
    write_export(pristine, history, average_modules(modules), spec, output, results=results)
    return {**info, "mode": "adapter", "base_model": spec.base_model}


def _load_base(source: str, config: LoraConfig, base: str, task: str, modules: dict):
    """The pristine base model, checked first (on the meta device, from its config) to hold a weight of each shape
    the adapters adapt or train in full; a classifier's head with as many classes as the adapters' heads."""
    revision = config.revision
    try:
        model_config = AutoConfig.from_pretrained(base, revision=revision)
    except (*HUB_ERRORS, TypeError) as err:
        raise invalid("base_model_name_or_path", base, f"cannot be read ({type(err).__name__}).") from None
    labels, meta = None, _on_meta(task, model_config)
    if task != "causal_lm" and head_labels(meta, model_config.num_labels, modules) != model_config.num_labels:
        model_config.num_labels = labels = head_labels(meta, model_config.num_labels, modules)
        meta = _on_meta(task, model_config)
    _check_model(source, config, modules, model_shapes(meta), f"the base model {base}")
    extra = {} if labels is None else {"num_labels": labels, "ignore_mismatched_sizes": True}
    with seeded(0):  # a head of another size is new: drawn the same way every time, so a merge's folder is too
        return MODEL_CLASSES[task].from_pretrained(base, revision=revision, **extra)


def _check_model(source: str, config: LoraConfig, modules: dict, shapes: dict, where: str) -> None:
    """The model (its parameters' `shapes`) holds a weight of each shape the adapter `source` adapts or trains in
    full; a mismatch is `<key> = <shape>: ...`."""
    fix = "merge adapters trained from this model (a classifier's head: with the classes they were trained on)."
    check_fit(lora_weight_shapes(source, config.fan_in_fan_out), shapes, where, fix, field="target_modules")
    check_fit(modules, shapes, where, fix)


def _on_meta(task: str, model_config):
    """The model of `model_config` on the meta device: its parameters' shapes, nothing allocated or loaded."""
    with torch.device("meta"):
        return MODEL_CLASSES[task].from_config(model_config)


def _merge_lora(pristine, config, adapters, strategy) -> tuple[list, list]:
    """Each adapter's LoRA weights merged in order by `strategy`: the export's records and (alpha, raw) per task."""
    lora = lora_arguments(config)
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules,
                             use_rslora=lora.use_rslora, fan_in_fan_out=config.fan_in_fan_out)  # fmt: skip
    model = get_peft_model(copy.deepcopy(pristine), peft_config)
    weights = ModelWeights(model)
    theta0 = weights.snapshot()
    strategy.pretrained = theta0 if strategy.needs_pretrained else None
    history, alphas, low_rank = [], [], True
    for t, source in enumerate(adapters):
        load_adapter_weights(model, source, lora_only=True)
        vector = weights.task_vector({})
        plan = merge_task(weights, strategy, t, vector, {})
        alphas.append((plan.choice.alpha, plan.choice.raw))
        low_rank = low_rank and plan.low_rank
        history.append(task_record(vector.adapter, plan.alpha) if plan.low_rank else None)
    if not low_rank:
        merged = weights.snapshot()
        history = [dense_record({k: merged[k] - theta0[k] for k in merged}, config.fan_in_fan_out)]
    return history, alphas


def _tokenizer(base: str, revision: str | None):
    """The base model's tokenizer, saved beside the merged adapter (None when the base has none)."""
    try:
        return AutoTokenizer.from_pretrained(base, revision=revision)
    except (*HUB_ERRORS, TypeError):
        return None
