"""`ContinualTrainer`: continual fine-tuning of one model on a sequence of tasks with Perturb-and-Merge, in the style
of TRL's trainers — construct it, `.train()`, `.add_task(...)`, `.train()` again, `.evaluate()`, `.save_model()`,
`.push_to_hub()`. Models and datasets may be objects, Hub ids or paths; the YAML/CLI path (`run_continual`,
`pm-hf train`) builds the same object from the six argument groups; `pm_hf.run.assembly` puts the parts together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

from accelerate import PartialState
from transformers import PreTrainedModel, TrainerControl, TrainerState

from .config.checks import InputError, check_devices_here, check_loop_training, invalid
from .config.groups import (
    DataArguments,
    FisherArguments,
    LoraArguments,
    MergeArguments,
    ModelArguments,
    PMConfig,
    RunConfig,
)
from .config.training_args import as_pm_config
from .data.given import check_given_classes, prepare_task, task_list
from .data.streams import TaskStream
from .distributed.launch import refuse_sharding
from .errors import python_names
from .heads.alignment import HeadAlignment
from .hub.export import copy_task_records
from .hub.repository import BASE_BRANCH, connect, download_state, is_repo_id, push_run
from .method.adapters import has_lora
from .method.callbacks import ContinualTrainOutput, History
from .method.strategies import build_strategy
from .run.assembly import (
    IN_MEMORY,
    Callbacks,
    build_loop,
    quiet_datasets,
)
from .run.checkpoint import LATEST, copy_checkpoint, state_files
from .run.evaluation import evaluation_metrics
from .run.from_objects import append_tasks, loop_from_objects, resume_check
from .run.inputs import callback_instances, check_objects, destination, resume_flag
from .run.loop import ContinualLoop
from .run.run_export import export_run
from .run.rundir import IN_USE, check_claim, claim, in_use, output_lock

# the CLI's own flags as a Python user gives them (`--<field>` becomes `<its argument>.<field>`)
RESUME, OVERWRITE = "train(resume_from_checkpoint=True)", "args.overwrite_output_dir=True"
PYTHON_FLAGS = {"resume": RESUME, "overwrite_output_dir": OVERWRITE}


class ContinualTrainer:
    """Train one model on a sequence of tasks with Perturb-and-Merge.

        trainer = ContinualTrainer(model="sentence-transformers/all-MiniLM-L6-v2", args=PMConfig(output_dir="out"),
                                   tasks=[DatasetDict(train=ds0, test=ds0_eval), {"train": ds1, "validation": ds1v}])
        trainer.train()                               # TrainOutput(global_step, training_loss, metrics)
        trainer.results["accuracy_matrix"]            # row t: scores after task t (results.json)
        trainer.add_task({"train": ds2, "test": ds2_eval}).train()  # only the new task trains
        trainer.evaluate(); trainer.save_model(); trainer.push_to_hub()

    Args:
        model: a Hub id, a local folder or a `PreTrainedModel` (a classifier or a causal LM, not yet LoRA-wrapped).
        args: a `PMConfig` (TrainingArguments + perturbation), or a plain `TrainingArguments`, taken as the PMConfig
            of the fields it sets (as TRL's trainers take one; the perturbation keeps its defaults).
        tasks: per task a `DatasetDict` or dict of splits (Datasets or lists of rows) under `data_args.train_split`
            and `data_args.eval_split` ('test', 'validation' or 'eval' while it is left at 'test'), or the training
            split alone (a Dataset or a list of rows): such a task is trained and merged, never scored. Classifiers:
            columns `text` (or `image`) and `label`, labels are global class ids and a task's classes are its training
            labels (the training split may be an `IterableDataset` with text and `classes` given). Causal LMs: columns
            `prompt` and `response`. Column names and the scenario come from `data_args`.
        processing_class: the tokenizer or image processor (default: loaded with the model).
        compute_metrics: `fn(EvalPrediction) -> dict` for classifiers, scored on every seen task after every task
            (each key becomes a score matrix next to 'accuracy').
        callbacks: `ContinualCallback`s (hooks of the loop) and `TrainerCallback`s (given to every task's trainer;
            `on_evaluate` gets each task's `eval_continual/*` metrics).
        lora_args, fisher_args, merge_args, data_args, model_args: the other argument groups (defaults otherwise).
    """

    def __init__(
        self,
        model,
        args: PMConfig,
        tasks: Sequence = (),
        processing_class=None,
        compute_metrics: Callable | None = None,
        callbacks: Callbacks | None = None,
        lora_args: LoraArguments | None = None,
        fisher_args: FisherArguments | None = None,
        merge_args: MergeArguments | None = None,
        data_args: DataArguments | None = None,
        model_args: ModelArguments | None = None,
    ):
        args = as_pm_config(args)
        # what failed deep in the loop, or after the first task trained, named here
        check_objects(lora_args, fisher_args, merge_args, data_args, model_args, processing_class, compute_metrics)
        callbacks = callback_instances(callbacks)
        self.args, self.lora_args = args, lora_args or LoraArguments()
        self.fisher_args, self.merge_args = fisher_args or FisherArguments(), merge_args or MergeArguments()
        self.data_args = data_args or DataArguments()
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "name_or_path", "")
        self.model_args = model_args or ModelArguments(model_name_or_path=name or IN_MEMORY)
        self.state = TrainerState(is_local_process_zero=args.local_process_index == 0,
                                  is_world_process_zero=args.process_index == 0)  # fmt: skip
        self._history, self._results = History(self.state), None
        self._cli = self.__dict__.get("_cli", False)  # set by `from_args`: the errors keep the config's names
        self._callbacks, self._claimed, self._resuming = [*(callbacks or []), self._history], False, False
        self.loop: ContinualLoop | None = None
        with self._python_names():
            self._pending = task_list(tasks)
            self._check_and_connect(model)
        self._model, self._processor, self._compute_metrics = model, processing_class, compute_metrics

    def _check_and_connect(self, model) -> None:
        args = self.args
        self.strategy = build_strategy(self.merge_args)  # every merge knob checked first
        HeadAlignment.check_args(self.merge_args)
        if not isinstance(model, (str, PreTrainedModel)) or (isinstance(model, PreTrainedModel) and has_lora(model)):
            fix = "give a Hub id, a local folder or a model without LoRA (one a ContinualTrainer trained holds it: load"
            raise invalid("model", type(model).__name__, fix + " it again, or resume with a fresh copy).")
        refuse_sharding(args)  # before anything is loaded: FSDP1, FSDP / DeepSpeed where Accelerate runs DDP
        check_loop_training(args)  # the task Trainers' own evaluation, label names: as `pm-hf train` checks them
        check_devices_here(fisher_device=self.fisher_args.fisher_device,
                           accumulator_device=self.merge_args.accumulator_device)  # fmt: skip
        # the Hub before anything is loaded or trained: write access checked, a pushed state downloaded
        main = args.should_save
        if main and in_use(Path(args.output_dir)):  # another live process trains there: refused before loading
            raise invalid("output_dir", args.output_dir, IN_USE)
        self.hub = connect(args) if args.push_to_hub and main else None
        source = args.resume_from
        if source and main and is_repo_id(source):
            source = str(download_state(source, args.hub_token))
        elif source and not (Path(source) / LATEST).is_file():  # before the output folder is locked
            raise invalid("resume_from", source, "holds no checkpoint (latest.json): give the output_dir of a run.")
        self._source = source

    @contextlib.contextmanager
    def _python_names(self):
        """Errors raised under it name the Python arguments (`args.resume_from`, `merge_args.merge_method`), not the
        CLI's flags; a trainer built from a config (`from_args`: the CLI's) keeps the config's names."""
        try:
            yield
        except InputError as err:
            if not self._cli:
                groups = ("args", "lora_args", "fisher_args", "merge_args", "data_args", "model_args")
                fields = {f.name: g for g in groups for f in dataclasses.fields(getattr(self, g))}
                message = python_names(str(err), fields, PYTHON_FLAGS)
                if message.startswith("resume = "):  # a resumed run that differs: train()'s argument
                    message = "resume_from_checkpoint" + message[len("resume") :]
                err.args = (message,)
            raise

    @classmethod
    def from_args(cls, model_args: ModelArguments, data_args: DataArguments, training_args: PMConfig,
                  lora_args: LoraArguments, fisher_args: FisherArguments, merge_args: MergeArguments,
                  callbacks: Callbacks | None = None, resume: bool = False) -> ContinualTrainer:  # fmt: skip
        """The trainer of a YAML/CLI config: model, data and every setting from the six argument groups; `resume`:
        a changed config or data is refused before the model is loaded."""
        groups = (lora_args, fisher_args, merge_args, data_args, model_args)
        trainer = cls.__new__(cls)
        trainer._cli = True
        trainer.__init__(model_args.model_name_or_path, training_args, (), None, None, callbacks, *groups)
        check = resume_check(model_args) if resume else None  # every rank: each refuses, none waits for the others
        trainer.loop = build_loop(trainer.run_config, trainer._callbacks, trainer.strategy, hub=trainer.hub,
                                  check_stream=check)  # fmt: skip
        return trainer

    @property
    def run_config(self) -> RunConfig:
        """The six argument groups as one object."""
        return RunConfig(self.model_args, self.data_args, self.args, self.lora_args, self.fisher_args, self.merge_args)

    # --------------------------------------------------------------------------------------------- tasks
    @property
    def model(self):
        return self._build().model

    @property
    def stream(self) -> TaskStream:
        return self._build().stream

    @property
    def results(self) -> dict:
        """results.json's content after the last `train()` (accuracy_matrix: row t = scores after task t)."""
        if self._results is None and self.loop is not None and self.loop.log:
            self._results = self.loop.results()
        return self._results or {}

    def add_task(self, task) -> ContinualTrainer:
        """Append a task to the sequence; the next `train()` trains it (and any other new task) on top."""
        self._pending.append(task)
        if self.loop is not None:
            with self._python_names():
                self._add_pending()
        return self

    def add_callback(self, callback) -> None:
        """Add a `ContinualCallback` (a hook of the loop) or a `TrainerCallback` (class or instance), as Trainer's."""
        (callback,) = callback_instances([callback])
        self._callbacks.append(callback)
        if self.loop is not None:
            self.loop.add_callback(callback)

    def pop_callback(self, callback):
        """Remove a callback given to this trainer (an instance, or a class: its first instance) and return it, as
        Trainer's; None when there is none."""
        match = (lambda cb: isinstance(cb, callback)) if isinstance(callback, type) else (lambda cb: cb is callback)
        found = next((cb for cb in self._callbacks if match(cb)), None)
        if found is not None:
            self._callbacks.remove(found)
            if self.loop is not None:
                self.loop.remove_callback(found)
        return found

    def remove_callback(self, callback) -> None:
        """`pop_callback` without the return value, as Trainer's."""
        self.pop_callback(callback)

    def _build(self) -> ContinualLoop:
        if self.loop is None:
            with self._python_names():
                self.loop = loop_from_objects(self)
        return self.loop

    def _add_pending(self) -> None:
        tasks, self._pending = self._pending, []  # a refused task is not added
        with quiet_datasets():
            prepared = self._prepare(tasks, self.loop.stream, self.loop.processor)
        done = self.loop.stream.tasks
        check_given_classes([*done, *(t for t, _ in prepared)], len(done), self.data_args)
        append_tasks(self.loop, prepared)

    def _prepare(self, entries: list, stream: TaskStream, processor) -> list:
        """The tasks `entries` (appended after the stream's), each prepared and checked against the stream."""
        first, may_stream = len(stream.tasks), self.args.max_steps > 0 and bool(self.fisher_args.fisher_max_samples)
        return [prepare_task(first + i, entry, stream, processor, self.data_args, self.args.seed, may_stream)
                for i, entry in enumerate(entries)]  # fmt: skip

    # --------------------------------------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: bool | str = False, stop_after: int | None = None) -> ContinualTrainOutput:
        """Train every task not trained yet (resuming `output_dir`'s run first when asked). Returns
        `TrainOutput(global_step, training_loss, metrics)` as `Trainer.train` does (`.results`: results.json's
        content, also `self.results`); each task's metrics reach the callbacks' `on_evaluate` and `self.state`."""
        with self._python_names():
            resume_from_checkpoint = resume_flag(resume_from_checkpoint, self.args.output_dir, stop_after)
            if self.args.should_save and not self._claimed:  # before the model is loaded (again under the lock)
                check_claim(Path(self.args.output_dir), resume_from_checkpoint, self.args.overwrite_output_dir)
        self._resuming = resume_from_checkpoint and not self._claimed
        loop = self._build()
        with self._python_names():
            if self._pending:
                self._add_pending()
            mark = len(self._history.train_losses)
            self._results = self._run(loop, resume_from_checkpoint, stop_after)
        return self._history.output(loop.log, mark, self._results)

    def _run(self, loop: ContinualLoop, resume_from_checkpoint: bool, stop_after: int | None) -> dict:
        save, overwrite, first = self.args.should_save, self.args.overwrite_output_dir, not self._claimed
        source = self._source if first else None
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

    # --------------------------------------------------------------------------------------------- after training
    def evaluate(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score the current (merged) model on every task trained so far (before any training: on every task given),
        as `Trainer.evaluate` does: `eval_<score>` over all those tasks' eval rows pooled (`eval_accuracy`: the
        accuracy over all seen classes) and `eval_task_<j>_<score>` per task; logged, reported to the trackers and
        to the callbacks' `on_evaluate`. A task without an eval split has no score."""
        loop = self._build()
        with self._python_names():
            if self._pending:
                self._add_pending()
        tasks = loop.stream.tasks[: len(loop.log)] or loop.stream.tasks
        scores, sizes = loop.evaluator.evaluate_seen(tasks), [task.eval_size for task in tasks]
        loop.head.set_active(None)  # the model predicts over every class again
        metrics = evaluation_metrics(scores, sizes, metric_key_prefix)
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        for callback in loop.trainer_callbacks:
            callback.on_evaluate(self.args, self.state, TrainerControl(), metrics=metrics)
        loop.reporters.log(self.state.global_step, metrics)
        loop.reporters.close()
        return metrics

    def _trained(self, what: str) -> ContinualLoop:
        if self.loop is None or not self.loop.log:
            raise invalid(what, None, "nothing is trained yet: call train() first.")
        return self.loop

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the merged model as the run does at its end (the exact merged adapter with its card and
        pm_hf_export.json, see `ContinualLoop.export`) to `output_dir` (default: args.output_dir/merged_adapter)."""
        loop = self._trained("save_model")
        if output_dir is not None:  # a file in its place or above it, a folder of other files: refused first
            destination(output_dir, field="output_dir")
        if self.args.should_save:
            export_run(loop, Path(output_dir) if output_dir else None)

    def push_to_hub(self, commit_message: str | None = None, token: str | None = None, revision: str | None = None,
                    **kwargs) -> str | None:  # fmt: skip
        """Push the merged model (the export, card and plots, and with `push_continual_state` the continual state) to
        `args.hub_model_id` as one commit, as a run pushes (`pm_hf.hub.repository`); write access is checked first.
        Returns the commit id (None on other processes)."""
        loop = self._trained("push_to_hub")
        if not self.args.should_save:
            return None
        a, target = self.args, self.hub
        if target is None or token is not None or revision is not None:
            hub = SimpleNamespace(
                hub_model_id=a.hub_model_id,
                hub_token=token or a.hub_token,
                output_dir=a.output_dir,
                hub_private_repo=a.hub_private_repo,
                hub_revision=revision or a.hub_revision,
                overwrite_hub_state=a.overwrite_hub_state,
            )
            with self._python_names():
                target = connect(hub)
        t, info = len(loop.log) - 1, {"repo_id": target.repo_id, "tagged": False}
        message = commit_message or f"pm_hf: after task {t + 1}/{len(loop.stream.tasks)} ({loop.log[t]['task']})"
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "export"
            export_run(loop, folder, info=info, base_ref=(target.repo_id, BASE_BRANCH))
            state = state_files(loop.out) if a.push_continual_state else None
            return push_run(target, folder, state, message, None)


def run_continual(model_args: ModelArguments, data_args: DataArguments, training_args: PMConfig,
                  lora_args: LoraArguments, fisher_args: FisherArguments, merge_args: MergeArguments,
                  resume: bool = False, callbacks: Callbacks | None = None,
                  stop_after: int | None = None) -> dict:  # fmt: skip
    """Run (or resume) the sequence of a config: `ContinualTrainer.from_args(...).train(resume)`.

    Args:
        *_args: the six argument groups (see `pm_hf.config.groups`).
        resume: continue after the last completed task of `output_dir` (a config whose tasks extend the saved ones
            trains the new tasks on top; any other change is refused).
        callbacks: `ContinualCallback`s (hooks of the loop) and `TrainerCallback`s (given to every task's trainer).
        stop_after: stop after this many completed tasks (for tests and staged runs).

    Returns:
        The results dict written to `output_dir/results.json`.
    """
    run = RunConfig(model_args, data_args, training_args, lora_args, fisher_args, merge_args)
    trainer = ContinualTrainer.from_args(*run.groups, callbacks=callbacks, resume=resume)
    trainer.train(resume, stop_after)
    return trainer.results
