"""`ContinualTrainer`: continual fine-tuning of one model on a sequence of tasks with Perturb-and-Merge, in the style
of TRL's trainers — construct it, `.train()`, `.add_task(...)`, `.train()` again. Models and datasets may be objects,
Hub ids or paths; the YAML/CLI path (`run_continual`, `pm-hf train`) builds the same object from the six argument
groups; `pm_hf.assembly` puts the parts together.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
from accelerate import PartialState
from transformers import PreTrainedModel

from .alignment import HeadAlignment
from .assembly import IN_MEMORY, Callbacks, assemble, build_loop, is_causal, quiet_datasets, task_fingerprint
from .checkpoint import LATEST, copy_checkpoint
from .checks import invalid
from .config import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig
from .data import Task, TaskStream, collator_for, task_from_datasets
from .export import copy_task_records
from .heads import find_head
from .hub import connect, download_state, is_repo_id
from .instruct import MODALITY, CausalLMCollator, instruction_task, resolve_pad_token_id
from .launch import refuse_sharding
from .loop import ContinualLoop, seeded
from .models import load_processor
from .rundir import check_claim, claim, output_lock
from .strategies import build_strategy
from .zero3 import loading_whole


class ContinualTrainer:
    """Train one model on a sequence of tasks with Perturb-and-Merge.

        trainer = ContinualTrainer(model="sentence-transformers/all-MiniLM-L6-v2", args=PMConfig(output_dir="out"),
                                   tasks=[{"train": ds0, "test": ds0_eval}, {"train": ds1, "test": ds1_eval}])
        results = trainer.train()                     # results["accuracy_matrix"]: row t after task t
        trainer.add_task({"train": ds2, "test": ds2_eval}).train()  # only the new task trains

    Args:
        model: a Hub id, a local folder or a `PreTrainedModel` (a classifier or a causal LM, not yet LoRA-wrapped).
        args: `PMConfig` (TrainingArguments + perturbation).
        tasks: `{"train": Dataset, "test": Dataset}` per task. Classifiers: columns `text` (or `image`) and `label`,
            labels are global class ids and a task's classes are its training labels (the training split may be an
            `IterableDataset` with text and `classes` given). Causal LMs: columns `prompt` and `response`. Column
            names and the scenario come from `data_args`.
        processing_class: the tokenizer or image processor (default: loaded with the model).
        compute_metrics: `fn(EvalPrediction) -> dict` for classifiers, scored on every seen task after every task
            (each key becomes a score matrix next to 'accuracy').
        callbacks: `ContinualCallback`s (hooks of the loop) and `TrainerCallback`s (given to every task's trainer).
        lora_args, fisher_args, merge_args, data_args, model_args: the other argument groups (defaults otherwise).
    """

    def __init__(
        self,
        model,
        args: PMConfig,
        tasks: Sequence[dict] = (),
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: Callbacks | None = None,
        lora_args: LoraArguments | None = None,
        fisher_args: FisherArguments | None = None,
        merge_args: MergeArguments | None = None,
        data_args: DataArguments | None = None,
        model_args: ModelArguments | None = None,
    ):
        self.args, self.lora_args = args, lora_args or LoraArguments()
        self.fisher_args, self.merge_args = fisher_args or FisherArguments(), merge_args or MergeArguments()
        self.data_args = data_args or DataArguments()
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "")
        self.model_args = model_args or ModelArguments(model_name_or_path=name or IN_MEMORY)
        self.strategy = build_strategy(self.merge_args)  # every merge knob checked first
        HeadAlignment.check_args(self.merge_args)
        self._callbacks, self._claimed = list(callbacks or []), False
        self._pending = list(tasks)
        if not isinstance(model, (str, PreTrainedModel)):
            raise invalid("model", type(model).__name__, "give a Hub id, a local folder or a (not LoRA-wrapped) model.")
        self._model, self._processor, self._compute_metrics = model, processing_class, compute_metrics
        self.loop: ContinualLoop | None = None
        refuse_sharding(args)  # before anything is loaded: FSDP1, FSDP / DeepSpeed where Accelerate runs DDP
        # the Hub before anything is loaded or trained: write access checked, a pushed state downloaded
        main = args.should_save
        self.hub = connect(args) if args.push_to_hub and main else None
        source = args.resume_from
        if source and main and is_repo_id(source):
            source = str(download_state(source, args.hub_token))
        self._source = source

    @classmethod
    def from_args(
        cls,
        model_args: ModelArguments,
        data_args: DataArguments,
        training_args: PMConfig,
        lora_args: LoraArguments,
        fisher_args: FisherArguments,
        merge_args: MergeArguments,
        callbacks: Callbacks | None = None,
    ) -> ContinualTrainer:
        """The trainer of a YAML/CLI config: model, data and every setting from the six argument groups."""
        trainer = cls(
            model_args.model_name_or_path,
            training_args,
            (),
            None,
            None,
            callbacks,
            lora_args,
            fisher_args,
            merge_args,
            data_args,
            model_args,
        )
        trainer.loop = build_loop(
            model_args,
            data_args,
            training_args,
            lora_args,
            fisher_args,
            merge_args,
            trainer._callbacks,
            trainer.strategy,
        )
        return trainer

    # --------------------------------------------------------------------------------------------- tasks
    @property
    def model(self):
        return self._build().model

    @property
    def stream(self) -> TaskStream:
        return self._build().stream

    def add_task(self, task: dict) -> ContinualTrainer:
        """Append a task to the sequence; the next `train()` trains it (and any other new task) on top."""
        self._pending.append(task)
        if self.loop is not None:
            self._add_pending()
        return self

    def _build(self) -> ContinualLoop:
        if self.loop is None:
            self.loop = _loop_from_objects(self)
        return self.loop

    def _add_pending(self) -> None:
        loop, tasks = self.loop, self._pending
        self._pending = []
        first = len(loop.stream.tasks)
        with quiet_datasets():
            prepared = [_prepare_task(self, first + i, entry, loop.stream) for i, entry in enumerate(tasks)]
        loop.stream.tasks.extend(prepared)
        loop.config["fingerprints"]["tasks"] += [task_fingerprint(t) for t in prepared]
        needed = max([c + 1 for t in loop.stream.tasks for c in t.classes], default=0)
        if needed > loop.stream.num_classes:  # new classes grow the head
            loop.stream.num_classes = needed
            with seeded(self.args.seed), loading_whole():  # new rows as a model loaded with every class has them
                fresh = find_head(loop.load_base(), needed)[1]
            loop.head.grow(loop.model, needed, fresh)

    # --------------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: bool = False, stop_after: int | None = None) -> dict:
        """Train every task not trained yet (resuming `output_dir`'s run first when asked); returns the results,
        as written to `output_dir/results.json` (`accuracy_matrix`: row t = scores after task t)."""
        loop = self._build()
        if self._pending:
            self._add_pending()
        save, overwrite, first = self.args.should_save, self.args.overwrite_output_dir, not self._claimed
        source = self._source if first else None
        loop.hub = self.hub
        if save and first:  # before the lock: a refused folder stays as it was
            check_claim(loop.out, resume_from_checkpoint, overwrite)
        with output_lock(loop.out, save):
            if save and first:
                claim(loop.out, resume_from_checkpoint, overwrite)
                if source and not (resume_from_checkpoint and (loop.out / LATEST).exists()):
                    copy_task_records(Path(source), loop.out, copy_checkpoint(Path(source), loop.out))
            PartialState().wait_for_everyone()  # other ranks start once the folder is claimed (and a source copied)
            self._claimed = True
            resume = first and (resume_from_checkpoint or source is not None)
            return loop.run(resume=resume, stop_after=stop_after)


# ------------------------------------------------------------------------------------------------ assembly
def _prepare_task(trainer: ContinualTrainer, t: int, entry, stream: TaskStream) -> Task:
    if isinstance(entry, Task):
        return entry
    if not isinstance(entry, dict):
        raise invalid(f"tasks[{t}]", type(entry).__name__, "give {'train': Dataset, 'test': Dataset} per task.")
    if stream.modality == MODALITY:
        return instruction_task(t, entry, trainer.loop.evaluator.tokenizer, trainer.data_args, trainer.args.seed)
    task, modality, names = task_from_datasets(t, entry, trainer.loop.processor, trainer.data_args)
    if modality != stream.modality:
        raise invalid(f"tasks[{t}]", modality, f"the sequence is {stream.modality}: use one modality.")
    if not isinstance(task.train, datasets.Dataset):
        if trainer.args.max_steps <= 0 or not trainer.fisher_args.fisher_max_samples:
            fix = "a streamed training split needs max_steps > 0 and fisher_max_samples (its Fisher sample)."
            raise invalid(f"tasks[{t}]", "IterableDataset", fix)
    stream.label_names += [names.get(c, str(c)) for c in range(len(stream.label_names), max(task.classes) + 1)]
    return task


def _first_task_stream(trainer: ContinualTrainer, causal: bool, processor, first: dict) -> TaskStream:
    """The stream of the first task given as datasets: it fixes the modality (instructions, text or images)."""
    if causal:
        if trainer._compute_metrics is not None:
            fix = "is for classifiers; causal LMs are scored by exact match, ROUGE-L and their eval loss."
            raise invalid("compute_metrics", trainer._compute_metrics, fix)
        stream = TaskStream([], 0, [], MODALITY, CausalLMCollator(resolve_pad_token_id(processor)))
        stream.tasks.append(instruction_task(0, first, processor, trainer.data_args, trainer.args.seed))
        return stream
    with quiet_datasets():
        task, modality, names = task_from_datasets(0, first, processor, trainer.data_args)
    labels = [names.get(c, str(c)) for c in range(max(task.classes) + 1)]
    return TaskStream([task], len(labels), labels, modality, collator_for(modality, processor))


def _loop_from_objects(trainer: ContinualTrainer) -> ContinualLoop:
    """The loop of a trainer built from objects: the first task fixes the modality; the others are appended."""
    if not trainer._pending:
        raise invalid("tasks", [], "give at least one task before training.")
    args, model_args, model = trainer.args, trainer.model_args, trainer._model
    causal = is_causal(model, model_args)
    if causal:
        model_args = dataclasses.replace(model_args, model_task="causal_lm")
    processor = trainer._processor
    if processor is None and model_args.model_name_or_path != IN_MEMORY:
        processor = load_processor(model_args)
    stream = _first_task_stream(trainer, causal, processor, trainer._pending.pop(0))
    if isinstance(model, PreTrainedModel):
        loaded = lambda: model  # noqa: E731 - the user's model, trained in place
        if model_args.model_name_or_path == IN_MEMORY:  # no folder to reload it from: a copy for the export's base
            pristine = copy.deepcopy(model).cpu()
            model_args = dataclasses.replace(model_args, model_name_or_path=IN_MEMORY)
            loaded_base = lambda: copy.deepcopy(pristine)  # noqa: E731
        else:
            loaded_base = None
    else:
        loaded = loaded_base = None
    loop = assemble(
        model_args,
        trainer.data_args,
        args,
        trainer.lora_args,
        trainer.fisher_args,
        trainer.merge_args,
        trainer._callbacks,
        trainer.strategy,
        stream,
        processor,
        loaded,
        trainer._compute_metrics,
        loaded_base,
    )
    trainer.loop = loop
    trainer._add_pending()
    return loop


def run_continual(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PMConfig,
    lora_args: LoraArguments,
    fisher_args: FisherArguments,
    merge_args: MergeArguments,
    resume: bool = False,
    callbacks: Callbacks | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or resume) the sequence of a config: `ContinualTrainer.from_args(...).train(resume)`.

    Args:
        *_args: the six argument groups (see `pm_hf.config`).
        resume: continue after the last completed task of `output_dir` (a config whose tasks extend the saved ones
            trains the new tasks on top; any other change is refused).
        callbacks: `ContinualCallback`s (hooks of the loop) and `TrainerCallback`s (given to every task's trainer).
        stop_after: stop after this many completed tasks (for tests and staged runs).

    Returns:
        The results dict written to `output_dir/results.json`.
    """
    groups = (model_args, data_args, training_args, lora_args, fisher_args, merge_args)
    return ContinualTrainer.from_args(*groups, callbacks=callbacks).train(resume, stop_after)
