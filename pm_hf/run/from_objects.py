"""The loop of a `pm_hf.continual.ContinualTrainer` built from objects (a model object or id, tasks as datasets or
rows): every task prepared and checked, the images against the model's config and a resumed run against the saved
one, before the model is loaded; then `pm_hf.run.assembly.assemble` and the later tasks appended."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from transformers import PreTrainedModel

from ..config.checks import invalid
from ..config.groups import ModelArguments
from ..data.given import add_label_names, check_given_classes, first_stream
from ..data.images import check_image_fit
from ..method.models import config_of, load_processor, model_digest
from .assembly import (
    IN_MEMORY,
    assemble,
    is_causal,
    quiet_datasets,
    refuse_changed_resume,
    task_fingerprint,
    weights_digest,
)
from .loop import ContinualLoop


def loop_from_objects(trainer) -> ContinualLoop:
    """The loop of a trainer built from objects: the first task fixes the modality; every task is prepared and
    checked before the model is loaded, then the others are appended."""
    if not trainer._pending:
        raise invalid("tasks", [], "give at least one task before training.")
    model_args, model = trainer.model_args, trainer._model
    causal = is_causal(model, model_args)
    if causal:
        model_args = dataclasses.replace(model_args, model_task="causal_lm")
        if trainer._compute_metrics is not None:
            fix = "is for classifiers; causal LMs are scored by exact match, ROUGE-L and their eval loss."
            raise invalid("compute_metrics", trainer._compute_metrics, fix)
    processor = trainer._processor
    if processor is None and model_args.model_name_or_path != IN_MEMORY:
        processor = load_processor(model_args)
    if processor is None and getattr(getattr(model, "config", None), "vocab_size", None):  # a TypeError, before
        fix = "no tokenizer came with this language model: give processing_class=its tokenizer."
        raise invalid("processing_class", None, fix)
    with quiet_datasets():  # a refused task leaves the pending ones as they were
        stream = first_stream(trainer._pending[0], processor, trainer.data_args, trainer.args.seed, causal)
        prepared = trainer._prepare(trainer._pending[1:], stream, processor)
        check_given_classes([*stream.tasks, *(t for t, _ in prepared)], 0, trainer.data_args)
    if stream.modality == "image":  # images as they reach the model (no processor): its channels and size
        given = model if isinstance(model, PreTrainedModel) else None
        tasks, column = [*stream.tasks, *(t for t, _ in prepared)], trainer.data_args.image_column
        check_image_fit(tasks, processor, config_of(given, model_args), column)
    trainer._pending = []
    if isinstance(model, PreTrainedModel):
        loaded = lambda: model  # noqa: E731 - the user's model, trained in place
        classes = [c for task in [*stream.tasks, *(t for t, _ in prepared)] for c in task.classes]
        wider = not causal and getattr(model.config, "num_labels", 0) > 1 + max(classes, default=-1)
        # no folder to reload it from, or a head wider than the tasks' classes, which a reload would not have (the
        # export's base crashed at the end of the run): a copy for the export's base
        if model_args.model_name_or_path == IN_MEMORY or wider:
            pristine = copy.deepcopy(model).cpu()
            loaded_base = lambda: copy.deepcopy(pristine)  # noqa: E731
        else:
            loaded_base = None
    else:
        loaded = loaded_base = None
    run = trainer.run_config.replace(model_args=model_args)
    if trainer._resuming:  # a changed run: refused before loading, on every rank (as the loop refuses it)
        tasks = [*stream.tasks, *(t for t, _ in prepared)]
        refuse_changed_resume(run, tasks, weights_digest(model) if model_args.model_name_or_path == IN_MEMORY else
                              model_digest(model_args))  # fmt: skip
    parts = (trainer._callbacks, trainer.strategy, stream, processor, loaded, trainer._compute_metrics, loaded_base)
    loop = assemble(run, *parts, hub=trainer.hub)
    trainer.loop = loop
    append_tasks(loop, prepared)
    return loop


def resume_check(model_args: ModelArguments) -> Callable:
    """`build_loop`'s check of a resumed config run: its config, model files and data as the saved run's."""
    return lambda stream, run: refuse_changed_resume(run, stream.tasks, model_digest(model_args))


def append_tasks(loop: ContinualLoop, prepared: list) -> None:
    """Prepared tasks (with their label names) appended to the loop's sequence."""
    add_label_names(loop.stream, prepared)
    tasks = [task for task, _ in prepared]
    loop.add_tasks(tasks, [task_fingerprint(t) for t in tasks])
