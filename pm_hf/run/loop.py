"""The task loop. `run_task` is the algorithm of docs/method.md for task t: prepare (theta_hat_{t-1}, a fresh
adapter) -> train with perturbation -> task vector Delta_t -> the strategy's merge, which asks its `MergeContext` for
what it needs (the Fisher at theta*_t, the oracle's score, the calibration probe: made on demand) -> callbacks ->
evaluate every seen task -> log; then the checkpoint. The math is in `merge`, the strategies in `strategies`, the PEFT
plumbing in `adapters`, the class head in `heads`, the scores in `evaluation`; `pm_hf.run.assembly` assembles the parts.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config.checks import check_finite, invalid
from ..config.groups import RunConfig
from ..distributed.launch import BACKEND, task_training
from ..distributed.loading import loading_whole
from ..distributed.sharding import scalar
from ..heads.head import find_head
from ..hub.export import (
    record_digest,
    save_task_record,
    task_record,
)
from ..hub.repository import HubTarget
from ..method.adapters import (
    load_adapter_factors,
    reset_adapter,
    task_vector_norm,
)
from ..method.callbacks import CallbackList, ContinualCallback
from ..method.strategies import MergeContext, MergeStrategy, merge_task
from ..method.trainer import log_evaluation, task_checkpoint
from ..method.weights import LowRankWeights, ModelWeights
from ..timing import Timer
from .checkpoint import ContinualState, capture_rng, load_checkpoint, restore_rng, save_checkpoint, seeded
from .diagnostics import learning_warnings, training_losses
from .evaluation import seen_classes
from .measure import (
    MergeLine,
    alignment_of,
    eval_loss,
    feature_move,
    hold_out,
    loss_increase,
    reused_features,
    reverted_estimate,
    task_probe,
    validation_estimate,
)
from .metrics import seen_accuracy
from .reporting import SequenceReporters, summary_logs
from .results import results_dict, task_entry, write_outputs
from .run_export import export_run, push_missing, push_task
from .rundir import refuse_changes
from .task_passes import fisher_pass, task_trainer

logger = logging.getLogger(__name__)


class ContinualLoop:
    """The parts of one continual run and the task loop over them (built by `build_loop`)."""

    def __init__(
        self,
        model,
        stream,
        head,
        evaluator,
        strategy: MergeStrategy,
        run: RunConfig,
        callbacks: Sequence,
        load_base,
        save_modules: list[str],
        config: dict | None = None,
        weights: ModelWeights | None = None,
        processor=None,
        hub: HubTarget | None = None,
    ):
        args, accumulator_device = run.training_args, run.merge_args.accumulator_device
        self.model, self.stream, self.head, self.evaluator, self.strategy = model, stream, head, evaluator, strategy
        self.run_config, self.args, self.fisher_args, self.out = run, args, run.fisher_args, Path(args.output_dir)
        self.weights = weights or ModelWeights(model, accumulator_device)  # or a merged adapter (`LowRankWeights`)
        self.callbacks = CallbackList([cb for cb in callbacks if isinstance(cb, ContinualCallback)])
        self.trainer_callbacks = [cb for cb in callbacks if not isinstance(cb, ContinualCallback)]
        self.load_base, self.save_modules, self.config = load_base, save_modules, config or {}
        self.log: list[dict] = []
        self.processor = processor  # the tokenizer or image processor the stream was prepared with
        self.record = None  # the last task's exact export record, written with its checkpoint
        self.hub = hub  # where the run pushes (checked before training), see `pm_hf.hub.repository`
        self.reporters = SequenceReporters(args, self.out)  # report_to, once for the whole sequence
        self.resuming = False
        if strategy.needs_pretrained:
            strategy.pretrained = self.weights.snapshot(exclude=head.owns)
        if strategy.revisits_first_merge:  # the alignment keeps what an undone first merge restarts from
            alignment_of(self).keep_origin = True
        if strategy.old_width is not None:  # each class's width factor, read by later merges' estimates
            alignment_of(self).width_rule = strategy.old_width

    # --------------------------------------------------------------------------------------- one task
    def run_task(self, t: int) -> dict:
        """Train, merge and evaluate task t (the algorithm of docs/method.md); returns its log entry."""
        task, timer = self.stream.tasks[t], Timer("train", "fisher", "merge", "eval")
        # prepare: the strategy's start point (theta_hat_{t-1} by default) with a fresh adapter
        before = self.prepare_task(t, task)
        # train with perturbation
        trainer = self.train_task(t, task, timer)
        before = self.follow_sharding(before)
        self.callbacks.call("on_train_end", t, self.model, task)
        trained = self.trained_scores(t, task)
        # task vector: new classes' head rows are taken as trained, other classes' rows restored exactly
        with timer("merge"):
            vector = self.task_vector(t, task, before)
        # merge: theta_hat_t by the strategy, which asks the context for what it needs (Fisher, score, probe)
        context, line = self.merge_context(t, task, vector, before, trainer, timer)
        at_one = line().at(1.0, lambda: eval_loss(self, task)) if self.logs_loss_increase else None
        with timer("merge"):
            plan = merge_task(self.weights, self.strategy, context, before=before)
        # callbacks (head alignment: from the features a validation trial took at this alpha, if one did)
        with reused_features(self, context.made("validation"), plan.choice.alpha):
            self.callbacks.call("on_merge", t, self.model, task)
        measured = self.merge_measures(task, plan, context.made("fisher"), at_one)
        # evaluate every seen task
        with timer("eval"):
            scores = self.evaluator.evaluate_seen(self.stream.tasks[: t + 1])
        # log
        return self.log_task(t, task, trainer, vector, plan, scores, {**trained, "measured": measured}, timer)

    def prepare_task(self, t: int, task) -> dict:
        """Before training task t: its held-out part, the callbacks' `on_task_begin`, the start point; returns the
        fp32 values the fully trained parameters start from (their theta_hat_{t-1})."""
        strategy = self.strategy
        hold_out(task, strategy.holdout, self.args.seed + t, strategy.holdout_field)  # probe data, never trained on
        self.callbacks.call("on_task_begin", t, self.model, task)
        self.prepare(t)
        before = {k: p.detach().float().clone() for k, p in self.weights.trained_params().items()}
        self.head.set_active(self.head.train_classes(task))
        return before

    def train_task(self, t: int, task, timer: Timer):
        """Train task t with the perturbation (from its last mid-task checkpoint when resuming); returns the trainer."""
        trainer = task_trainer(self, t, task)
        with task_training(trainer), timer("train"):  # then the wrappers go (a DeepSpeed engine, its hooks)
            trainer.train(resume_from_checkpoint=task_checkpoint(self.out, t) if self.resuming else None)
        self.resuming = False
        return trainer

    def trained_scores(self, t: int, task) -> dict:
        """What is measured of theta*_t before the merge: the task vector's norm, the pre-merge scores."""
        delta_norm = task_vector_norm(self.model)
        pre, within = self.evaluator.pre_merge(task, seen_classes(self.stream.tasks[: t + 1]))
        return {"delta_norm": delta_norm, "pre": pre, "within": within}

    def task_vector(self, t: int, task, before: dict):
        """Delta_t, checked finite; the head rows of classes the task does not own are put back as they were."""
        seen_before = set(seen_classes(self.stream.tasks[:t]))
        merged_head = lambda key, delta: self.head.merged_delta(delta, task, seen_before)  # noqa: E731
        vector = self.weights.task_vector(before, self.head.owns, merged_head)
        check_finite(vector.deltas, f"the task vector of task {t}")
        self.head.restore_untouched(self.weights.trained_params(), before, task)
        return vector

    def merge_context(self, t: int, task, vector, before: dict, trainer, timer: Timer) -> tuple:
        """Task t's `MergeContext` (the Fisher, the oracle's score, the probe: each made when the strategy asks for
        it) and the merge line they measure along (built on first use, a copy of the adapted weights)."""

        @functools.cache
        def line() -> MergeLine:
            if self.strategy.needs_fisher:  # F_t is taken at theta*_t, and the line's measurements leave it
                _ = context.fisher
            return MergeLine(self.weights, vector, before)

        context = MergeContext.on_demand(
            t,
            vector,
            fisher=lambda: self.task_fisher(t, task, list(vector.deltas), timer),
            score=lambda: self.oracle_score(t, line()),
            probe=lambda: task_probe(line(), self, t, task, trainer),
            validation=lambda: validation_estimate(line(), self, t, task),
            reverted=lambda: reverted_estimate(line(), self, t, task),
            feature_move=lambda: feature_move(line(), self, task),
        )
        return context, line

    @property
    def logs_loss_increase(self) -> bool:
        """The quadratic model's predicted loss increase is logged (`log_loss_increase`) for a rule with a Fisher."""
        return self.run_config.merge_args.log_loss_increase and self.strategy.needs_fisher and not self.low_rank

    def merge_measures(self, task, plan, fisher, at_one: float | None) -> dict:
        """What the log keeps of the merge: the Fisher's trace (if the strategy asked for one) and, with
        `log_loss_increase`, the predicted against the measured loss increase."""
        measured = {"fisher_trace": sum(scalar(f.double().sum()) for f in fisher.values())} if fisher else {}
        if at_one is not None:
            measured["loss_increase"] = loss_increase(self, task, plan, at_one)
        return measured

    def log_task(self, t: int, task, trainer, vector, plan, scores: dict, trained: dict, timer: Timer) -> dict:
        """Task t's log entry (the callbacks' `on_task_end` may add to it), its export record and tracker logs."""
        pre, within, delta_norm = trained["pre"], trained["within"], trained["delta_norm"]
        entry = task_entry(task, scores, pre, plan, delta_norm, trainer.branch_counts, timer.seconds)
        losses = {str(b): v for b, v in trainer.branch_losses().items()} if hasattr(trainer, "branch_losses") else None
        entry.update(trained["measured"], calibration=plan.calibration, branch_losses=losses, pre_merge_til_acc=within)
        # the losses as logged (one per logging window) and the task's own optimizer steps (the Trainer counts from 0)
        entry.update(train_losses=training_losses(trainer.state.log_history), optimizer_steps=trainer.state.global_step)
        entry["warnings"] = learning_warnings(task.name, within, len(task.classes), entry["train_losses"])
        for warning in entry["warnings"]:
            logger.warning(warning)
        self.callbacks.call("on_task_end", t, self.model, entry)
        self.record = task_record(vector.adapter, plan.alpha) if plan.low_rank else None
        if self.record is not None:  # what an export checks the record's file against (the log is in the manifest)
            entry["record_sha256"] = record_digest(self.record)
        row, sizes = scores[self.evaluator.primary], [task.eval_size for task in self.stream.tasks[: t + 1]]
        log_evaluation(trainer, {"continual/task": t, "continual/alpha": plan.choice.alpha,  # eval/continual/*
                                 "continual/pre_merge_acc": pre, "continual/acc_seen": seen_accuracy(row, sizes),
                                 "continual/delta_norm": delta_norm,
                                 "continual/learning_warnings": len(entry["warnings"])})  # fmt: skip
        return entry

    def follow_sharding(self, before: dict) -> dict:
        """Once FSDP has sharded the model (the first Trainer prepares it), the continual state loaded or built
        before (a resumed S and G, fp32 masters, the task's `before`) is split the same way, each rank keeping its
        rows (the placement's `shard_state`; whole tensors stay whole). Returns `before` so split."""
        placement, like = self.weights.placement, self.weights.tensors()
        if not placement.splits(like):  # nothing split (one process, DDP, or not prepared yet): nothing to follow
            return before
        self.strategy.load_state_dict(placement.shard_state(self.strategy.state_dict(), like))
        self.weights.master = placement.shard_state(self.weights.master, like)
        return placement.shard_state(before, like)

    def prepare(self, t: int) -> None:
        """Task t's start: a fresh adapter (A drawn from (seed, t) only) or the strategy's, and its weights."""
        start = self.strategy.start_point(t)
        if start is None or start.adapter is None:
            reset_adapter(self.model, torch.Generator().manual_seed(self.args.seed + 7919 * t))
        else:
            load_adapter_factors(self.model, start.adapter)
        if start is not None:
            self.weights.restore(start.weights)

    @property
    def low_rank(self) -> bool:
        return isinstance(self.weights, LowRankWeights)

    def task_fisher(self, t: int, task, keys: list[str], timer: Timer) -> dict[str, torch.Tensor]:
        """F_t for a strategy that asks for it, timed as "fisher" and checked finite."""
        with timer("fisher"):
            fisher = fisher_pass(self, t, task, keys)
        check_finite(fisher, f"the Fisher of task {t}")
        return fisher

    def oracle_score(self, t: int, line: MergeLine):
        """score(alpha): held-out primary score on all seen tasks of theta_hat_{t-1} + alpha * Delta (adapter off),
        with the model as the callbacks would leave it after that merge (their `trial`: the head alignment)."""
        tasks = self.stream.tasks[: t + 1]

        def score() -> float:
            with self.callbacks.trial(t, self.model, tasks[t]):
                return self.evaluator.seen_score(tasks)

        return lambda a: line.at(a, score)

    # --------------------------------------------------------------------------------------- the sequence
    def add_callback(self, callback) -> None:
        """A `ContinualCallback` joins the loop's hooks; any other callback every later task's `Trainer`."""
        if isinstance(callback, ContinualCallback):
            self.callbacks = CallbackList([*self.callbacks.callbacks, callback])
        else:
            self.trainer_callbacks.append(callback)

    def remove_callback(self, callback) -> None:
        """`callback` (that instance) leaves the loop's hooks or the later tasks' Trainers."""
        self.callbacks = CallbackList([cb for cb in self.callbacks.callbacks if cb is not callback])
        self.trainer_callbacks = [cb for cb in self.trainer_callbacks if cb is not callback]

    def add_tasks(self, tasks: list, fingerprints: list[str]) -> None:
        """Tasks appended to the sequence (their fingerprints to the run's config); classes not seen before grow the
        head, their rows as a model loaded with every class has them."""
        self.stream.tasks.extend(tasks)
        self.config["fingerprints"]["tasks"] += fingerprints
        needed = max([c + 1 for t in self.stream.tasks for c in t.classes], default=0)
        self.stream.num_classes = max(self.stream.num_classes, needed)
        if needed > getattr(self.head, "num_classes", needed):  # a head as wide already (a model object's) stays
            with seeded(self.args.seed), loading_whole():
                fresh = find_head(self.load_base(), needed)[1]
            self.head.grow(self.model, needed, fresh)

    def restore(self, state: ContinualState) -> None:
        """A saved run's merged weights and log (a finished run evaluated, exported or pushed again)."""
        self.weights.load_state(self.head.fit_saved(state.weights, self.weights.trained_params()))
        self.log = list(state.log)

    def state(self) -> ContinualState:
        """The run's state with whole tensors (gathered where the rows are split: every rank calls this)."""
        keep, gather = self.args.should_save, self.weights.placement.gather
        callbacks = {key: gather(value, keep) for key, value in self.callbacks.state_dict().items()}
        weights, strategy = gather(self.weights.state(), keep), gather(self.strategy.state_dict(), keep)
        return ContinualState(len(self.log), weights, strategy, callbacks, self.log, capture_rng())

    def resume(self) -> None:
        """Continue the saved run: the same config and data (else refused), its state loaded and verified."""
        loaded = load_checkpoint(self.out)
        if loaded is None:
            logger.warning("--resume: no checkpoint in %s, starting from task 0", self.out)
            return
        state, saved = loaded
        refuse_changes(saved, self.config, self.out)
        if saved.get("pm_hf") != self.config.get("pm_hf"):  # its config and merge knobs compared, its code not
            was = saved.get("pm_hf", "of a version it did not record")
            logger.warning("--resume: %s was saved by pm_hf %s, resumed by %s", self.out, was, self.config.get("pm_hf"))
        try:
            self.weights.load_state(self.head.fit_saved(state.weights, self.weights.trained_params()))
            self.strategy.load_state_dict(self.weights.placement.shard_state(state.strategy, self.weights.tensors()))
            self.callbacks.load_state_dict(state.callbacks)
        except ValueError as err:  # keys or shapes that do not fit: a damaged or foreign checkpoint
            raise invalid("output_dir", str(self.out), f"its checkpoint does not fit this run: {err}") from err
        self.log = list(state.log)
        if state.rng is not None:  # the global RNGs as they were after that task (user callbacks may draw from them)
            restore_rng(state.rng)
        if self.args.should_save:  # results.json follows the state, also when a kill left it one task behind
            write_outputs(self.out, self.results())

    def save(self, t: int, state: ContinualState | None = None) -> None:
        if self.record is not None:
            save_task_record(self.out, t, self.record)
        path = save_checkpoint(self.out, state or self.state(), self.config)
        shutil.rmtree(self.out / "tasks" / f"task_{t}", ignore_errors=True)  # its mid-task checkpoints are spent
        write_outputs(self.out, self.results())
        self.callbacks.call("on_save", t, path)

    def checkpoint(self, t: int) -> None:
        """After task t: the checkpoint (and, with hub_strategy every_task, the push). Every rank calls it (under FSDP
        the state is gathered to the saving rank's host memory; nothing of it outlives the call)."""
        state = self.state()
        every_task = self.args.push_to_hub and self.args.hub_strategy == "every_task"  # the same on every rank
        whole = self.weights.gathered(self.args.should_save) if every_task else None
        if self.args.should_save:
            self.save(t, state)
            if self.hub is not None and whole is not None:
                push_task(self, t, whole)

    def results(self) -> dict:
        sizes = [task.eval_size for task in self.stream.tasks]
        out = results_dict(self.log, sizes, self.evaluator.primary, self.config, str(self.out))
        return {**out, "distributed": BACKEND.describe(self.args, self.model)}

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Run (or resume) the sequence; writes checkpoints, results.json, plots and, at the end, the export."""
        if resume:
            self.resume()
            self.resuming = True  # the next task continues from its last mid-task checkpoint, if it has one
            push_missing(self)  # a push that a kill or a full disk stopped after the last checkpoint
        T = len(self.stream.tasks)
        last = T if stop_after is None else min(T, stop_after)
        show = not self.args.disable_tqdm and self.args.should_log
        done = len(self.log)
        bar = tqdm(range(len(self.log), last), desc="tasks", initial=len(self.log), total=T, disable=not show)
        for t in bar:
            self.log.append(self.run_task(t))
            self.checkpoint(t)
            bar.set_postfix(alpha=f"{self.log[-1]['alpha']:.3f}")
        if len(self.log) == T:
            whole = self.weights.gathered(self.args.should_save)
            if self.args.should_save:
                export_run(self, whole=whole)
                if self.hub is not None and self.args.hub_strategy == "end" and len(self.log) > done:
                    push_task(self, T - 1, whole)
        self.head.set_active(None)  # the model predicts over every class again
        results = self.results()
        if len(self.log) > done:  # the summary, the matrix and the alpha table, at the sequence's last step
            self.reporters.log(sum(sum(e["branch_counts"].values()) for e in self.log), summary_logs(results))
        self.reporters.close()
        return results
