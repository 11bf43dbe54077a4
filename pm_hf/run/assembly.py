"""Assembly of the parts of a continual run for `pm_hf.run.loop.ContinualLoop` — the model (loaded with a head of the
stream's classes, or given), LoRA, the class head, the evaluator, head alignment, callbacks, and the run's config and
fingerprints — from the six argument groups (`build_loop`) or from objects (`pm_hf.continual.ContinualTrainer`).
The only module that knows all the parts."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, TrainerCallback

from ..config.checks import check_loop_training, invalid
from ..config.groups import DataArguments, MergeArguments, ModelArguments, PMConfig, RunConfig
from ..data.images import check_image_fit
from ..data.instruct import MODALITY, build_instruction_stream
from ..data.streams import Task, TaskStream, build_task_stream
from ..distributed.launch import fsdp_requested, refuse_sharding
from ..distributed.limits import check_split_model, check_split_run
from ..distributed.placement import for_run, place
from ..heads.alignment import HeadAlignment
from ..heads.head import Head, NoHead
from ..hub.origin import IN_MEMORY  # model_name_or_path of a model given as an object (re-exported for pm_hf.continual)
from ..hub.repository import HubTarget
from ..method.adapters import attach_lora, detect_target_modules, is_quantized, merge_key_shapes, uses_fan_in_fan_out
from ..method.callbacks import ContinualCallback
from ..method.models import (
    config_of,
    is_causal_lm,
    load_causal_lm,
    load_model,
    load_processor,
    model_digest,
    quiet_loading,
)
from ..method.strategies import build_strategy, resolved_knobs
from ..method.weights import LowRankWeights
from ..version import __version__
from .checkpoint import config_dict, saved_config, seeded
from .evaluation import CausalLMEvaluator, ClassifierEvaluator, trainer_predict
from .loop import ContinualLoop
from .rundir import check_writable, dataset_digest, refuse_changes

Callbacks = Sequence[ContinualCallback | TrainerCallback]


def task_fingerprint(task: Task) -> str:
    def digest(ds) -> str:
        if ds is None:  # a task without an eval split
            return "none"
        return dataset_digest(ds) if isinstance(ds, datasets.Dataset) else f"stream:{ds.info.dataset_name}"

    return f"{task.name}|{task.classes}|{digest(task.train)}|{digest(task.eval)}"


def is_causal(model, model_args: ModelArguments) -> bool:
    if isinstance(model, PreTrainedModel):
        names = [*(getattr(model.config, "architectures", None) or []), type(model).__name__]
        return any(n.endswith("ForCausalLM") for n in names)
    return is_causal_lm(model_args)


@contextlib.contextmanager
def quiet_datasets():
    """Preparing the task stream without datasets' progress bars."""
    enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            datasets.utils.logging.enable_progress_bar()


def weights_digest(model) -> str:
    """sha256 over a model's parameters and buffers (a model given as an object, with no folder behind it)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assemble(
    run: RunConfig,
    callbacks,
    strategy,
    stream,
    processor,
    loaded=None,
    compute_metrics=None,
    loaded_base=None,
    loop_class: Callable[..., ContinualLoop] = ContinualLoop,
    hub: HubTarget | None = None,
) -> ContinualLoop:
    """Model (loaded with a head of the stream's classes unless given), LoRA, head, evaluator, callbacks, config;
    `loop_class` is the loop's class or a function making one (a subclass with its own arguments bound)."""
    model_args, data_args, args, lora_args, fisher_args, merge_args = run.groups
    causal = stream.modality == MODALITY
    check_before_loading(strategy, causal, data_args, args, fisher_args, merge_args)  # every entry point assembles here

    def load_base():
        """A pristine pretrained model with a head of the stream's classes (the export's base)."""
        with quiet_loading():
            if loaded_base is not None:
                base = loaded_base()
                if not causal:
                    Head(base, base.config.num_labels).grow(base, stream.num_classes)
                return base
            if causal:
                return load_causal_lm(model_args)
            return load_model(model_args, stream.modality, stream.num_classes, stream.label_names)

    with seeded(args.seed):  # the new head's initialisation must not depend on what ran before in the process
        model = loaded() if loaded is not None else load_base()
    place(model, for_run(model, fsdp=fsdp_requested(args)))  # where its weights live, chosen once for the run
    low_rank = uses_merged_adapter(model, strategy, merge_args)  # checked before any Trainer exists
    build = _causal_parts if causal else _classifier_parts
    model, head, evaluator, extra, save_modules, lora_args = build(model, run, stream, processor, compute_metrics)
    check_split_model(args, low_rank, uses_fan_in_fan_out(model), lambda: merge_key_shapes(model))
    run = run.replace(lora_args=lora_args)  # with the target modules detected for a causal LM
    config = config_dict(*run.groups)
    identity = model_digest(model_args) if model_args.model_name_or_path != IN_MEMORY else weights_digest(model)
    fingerprints = {"model": identity, "tasks": [task_fingerprint(t) for t in stream.tasks]}
    config.update(world_size=args.world_size, fingerprints=fingerprints, merge_knobs=resolved_knobs(merge_args))
    config.update(pm_hf=__version__)  # which pm_hf wrote the record (a resume by another one says so)
    own = strategy.callbacks(stream)  # the strategy's part of training (OSF's layers, O-LoRA's loss)
    parts = (model, stream, head, evaluator, strategy, run, [*extra, *own, *callbacks], load_base, save_modules)
    weights = LowRankWeights(model, merge_args.accumulator_device, merge_args.merged_adapter_rank) if low_rank else None
    return loop_class(*parts, config, weights, processor=processor, hub=hub)


def _causal_parts(model, run: RunConfig, stream, processor, compute_metrics=None) -> tuple:
    """A causal LM: LoRA on q/k/v/o by default (detected per family), no class head, generation scores."""
    model_args, args, lora_args = run.model_args, run.training_args, run.lora_args
    if not lora_args.target_modules:
        lora_args = dataclasses.replace(lora_args, target_modules=detect_target_modules(model, "qkvo"))
    model = attach_lora(model, lora_args)
    evaluator = CausalLMEvaluator(model, processor, stream.collate_fn, args.per_device_eval_batch_size,
                                  model_args.max_new_tokens, model_args.primary_metric)  # fmt: skip
    return model, NoHead(), evaluator, [], list(lora_args.modules_to_save or []), lora_args


def _classifier_parts(model, run: RunConfig, stream, processor, compute_metrics=None) -> tuple:
    """A classifier: a head of the stream's classes (trained in full), LoRA, accuracy scores, the head alignment."""
    data_args, args, lora_args, merge_args = run.data_args, run.training_args, run.lora_args, run.merge_args
    head = Head(model, model.config.num_labels, domain_incremental=data_args.scenario == "domain_incremental")
    head.grow(model, stream.num_classes)
    model = attach_lora(model, lora_args, trainable_modules=head.modules)
    evaluator = ClassifierEvaluator(head, trainer_predict(model, args, stream.collate_fn), compute_metrics)
    extra = []
    if merge_args.head_align != "none":
        extra.append(HeadAlignment(head, stream, merge_args, args.per_device_eval_batch_size, args.seed))
    return model, head, evaluator, extra, [*head.modules, *(lora_args.modules_to_save or [])], lora_args


def check_before_loading(strategy, causal: bool, data_args, args, fisher_args, merge_args) -> None:
    """What the stream's modality, the scenario and the launch allow of the strategy, checked before the model is
    loaded (`assemble`, and `pm-hf check`, which loads no model); and that output_dir can be a folder (the evaluator's
    `Trainer` makes it as it is built)."""
    if args.should_save:
        check_writable(Path(args.output_dir))
    check_split_run(args, strategy, fisher_args, merge_args)
    strategy.check_training(args)
    if causal and merge_args.head_align != "none":
        raise invalid("head_align", merge_args.head_align, "a causal LM has no class head: use `head_align: none`.")
    if strategy.needs_pretrained and data_args.scenario == "domain_incremental":
        fix = "merges task vectors relative to the pretrained weights, for class- and task-incremental streams only; "
        raise invalid("merge_method", strategy.name, fix + "with domain_incremental use 'pm', 'average', 'coma', ...")


def uses_merged_adapter(model, strategy, merge_args: MergeArguments) -> bool:
    """Whether merges go to a merged adapter (`merge_into: adapter`, or 'auto' with a quantized base), which needs a
    strategy with one alpha per task merged from theta_hat_{t-1} and no measurement along the merge line."""
    return merges_into_adapter(is_quantized(model), strategy, merge_args)


def merges_into_adapter(quantized: bool, strategy, merge_args: MergeArguments) -> bool:
    """`uses_merged_adapter` for a base known to be quantized or not (`pm-hf check` reads it from the config)."""
    if merge_args.merge_into == "weights" and quantized:
        raise invalid("merge_into", "weights", "the base is quantized and cannot be written: use 'adapter' or 'auto'.")
    if merge_args.merge_into == "weights" or (merge_args.merge_into == "auto" and not quantized):
        return False
    if strategy.needs_pretrained or strategy.needs_score or strategy.needs_probe or strategy.needs_validation:
        fix = "is not available with a merged adapter (a quantized base): use pm, coma, average, seq-merge or sqrt-t."
        raise invalid("merge_method", strategy.name, fix)
    return True


def build_loop(
    run: RunConfig,
    callbacks: Callbacks = (),
    strategy=None,
    model: PreTrainedModel | None = None,
    processor=None,
    loop_class: Callable[..., ContinualLoop] = ContinualLoop,
    hub: HubTarget | None = None,
    check_stream: Callable[[TaskStream, RunConfig], None] | None = None,
) -> ContinualLoop:
    """Load the model and the task stream of a config and assemble the loop (nothing is written); `model` and
    `processor`, when given, are used instead of loading `model_name_or_path`'s; `loop_class` may be a subclass (or a
    function making one); `hub` is where the run pushes (checked before); `check_stream(stream, run)` runs once the
    data is read, before the model is loaded."""
    model_args, data_args, training_args, merge_args = run.model_args, run.data_args, run.training_args, run.merge_args
    strategy = strategy or build_strategy(merge_args)
    HeadAlignment.check_args(merge_args)
    refuse_sharding(training_args)
    check_loop_training(training_args)
    causal = is_causal(model, model_args)
    model_args = dataclasses.replace(model_args, model_task="causal_lm") if causal else model_args
    processor = processor if processor is not None else load_processor(model_args)
    with quiet_datasets():
        stream = config_stream(causal, data_args, processor, training_args, model_args.model_name_or_path)
    stream = strategy.transform_stream(stream)
    if stream.modality == "image":
        check_image_fit(stream.tasks, processor, config_of(model, model_args), data_args.image_column)
    run = run.replace(model_args=model_args)
    if check_stream is not None:
        check_stream(stream, run)
    loaded = None if model is None else lambda: model
    return assemble(run, callbacks, strategy, stream, processor, loaded, loop_class=loop_class, hub=hub)


def refuse_changed_resume(run: RunConfig, tasks: Sequence[Task], identity: str | None) -> None:
    """`--resume` of a run folder whose saved run had another config, model (`identity`: its `model_digest`, None to
    leave it to the loop) or data: refused once the data is read, before the model is loaded. The loop compares again
    with its own record once the model is built (the target modules a causal LM's family gives are known then)."""
    out = Path(run.training_args.output_dir)
    saved = saved_config(out) if out.is_dir() else None
    if saved is None:
        return
    lora = run.lora_args
    if not lora.target_modules:  # detected from the loaded model: the saved run's, until the loop checks them
        detected = saved.get("LoraArguments", {}).get("target_modules")
        lora = dataclasses.replace(lora, target_modules=detected)
    record = config_dict(*run.replace(lora_args=lora).groups)
    model = identity if identity is not None else saved.get("fingerprints", {}).get("model")
    record.update(world_size=run.training_args.world_size, merge_knobs=resolved_knobs(run.merge_args),
                  fingerprints={"model": model, "tasks": [task_fingerprint(t) for t in tasks]})  # fmt: skip
    refuse_changes(saved, record, out)


def config_stream(causal: bool, data_args: DataArguments, processor, args: PMConfig, name: str) -> TaskStream:
    """The task stream of a config (instructions for a causal LM, else classes), validated as it is built."""
    mpf = args.main_process_first
    if causal:
        return build_instruction_stream(data_args, processor, seed=args.seed, main_process_first=mpf)
    return build_task_stream(data_args, processor, seed=args.seed, main_process_first=mpf, model_name=name)
