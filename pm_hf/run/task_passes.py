"""The two passes of a task that run the model over its training data: the `PMTrainer` that trains it (with the
perturbation) and the Fisher pass at theta*_t (docs/method.md, stages 1 and 2). `ContinualLoop` calls both."""

from __future__ import annotations

import copy
import itertools

import datasets
import torch
from transformers import PrinterCallback, ProgressCallback

from ..distributed.launch import BACKEND
from ..method.adapters import scale_active_adapter
from ..method.fisher import estimate_fisher, normalize_fisher
from ..method.trainer import PMTrainer, TaskProgress
from .evaluation import seen_classes


def task_trainer(loop, t: int, task) -> PMTrainer:
    """The `PMTrainer` of task t: the run's arguments with the task's own output folder, no push, no token and no
    reporters of its own (the run's are shared: one logging run), the model prepared for the launch mode again."""
    args = copy.deepcopy(loop.args)
    args.output_dir = str(loop.out / "tasks" / f"task_{t}")  # mid-task checkpoints (save_strategy) go here
    args.eval_strategy, args.report_to = "no", "none"  # the run's reporters are shared below: one logging run
    args.push_to_hub = False  # per-task Trainers never push: the run's results go to the Hub as a whole
    args.hub_token = None  # nor hold the token: they pickle their args into every mid-task checkpoint
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    # the model wrapped for training again (else every task after the first trained without DDP), the DeepSpeed
    # plugin of the first task shared, ZeRO-3's between-task parameter hooks off (the task's engine brings its own)
    BACKEND.before_task_trainer(loop.model, args)
    trainer = PMTrainer(
        model=loop.model,
        args=args,
        train_dataset=task.train,
        data_collator=loop.stream.collate_fn,
        task_index=t,
        callbacks=[*loop.trainer_callbacks, *loop.reporters.callbacks],
        head_modules=loop.head.modules,
        step_offset=sum(sum(e["branch_counts"].values()) for e in loop.log),
    )
    BACKEND.check_prepared(trainer)  # FSDP really runs as FSDP; a sharded model is not wrapped again
    trainer.remove_callback(ProgressCallback)  # one bar per task under the bar over tasks; logs go to report_to
    trainer.remove_callback(PrinterCallback)
    if not args.disable_tqdm:
        trainer.add_callback(TaskProgress(t))
    return trainer


def fisher_pass(loop, t: int, task, keys: list[str]) -> dict[str, torch.Tensor]:
    """F_t on the task's training loss (docs/method.md): its classes' mask (all seen classes with `fisher_classes:
    seen`), at theta*_t (or with the adapter at 1 - eps with `fisher_point: perturbed`)."""
    fa = loop.fisher_args
    seen = fa.fisher_classes == "seen" and loop.head.train_classes(task) is not None
    loop.head.set_active(seen_classes(loop.stream.tasks[: t + 1]) if seen else task.classes)
    data = task.train
    if isinstance(data, datasets.IterableDataset):  # a streamed split: its first `fisher_max_samples` examples
        data = list(itertools.islice(data, fa.fisher_max_samples))
    point = 1.0 - loop.args.perturb_eps if fa.fisher_point == "perturbed" else 1.0
    with scale_active_adapter(loop.model, point):
        fisher = estimate_fisher(loop.model, data, loop.stream.collate_fn, fa, keys=keys, seed=loop.args.seed + t,
                                 show_progress=not loop.args.disable_tqdm)  # fmt: skip
    return normalize_fisher(fisher, fa.fisher_normalize, inplace=True)  # the pass's own tensors
