"""`PMTrainer`: a `transformers.Trainer` whose `training_step` runs inside the P&M perturbation.

The override is thin: it draws the step's branch, rescales the active LoRA adapter (or adds the Gaussian-noise
ablation) and calls `super().training_step`, which does the one forward and one backward. The scaling is restored
before `training_step` returns, so the optimizer step always sees the unperturbed adapter.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config.groups import PerturbationArguments
from ..distributed.launch import BACKEND
from ..distributed.placement import placement_of
from ..distributed.sharding import every_process, per_process
from ..errors import DivergenceError, invalid
from ..fileio import atomic_write_text, tree_digests
from .adapters import (
    active_layers,
    full_trainable_params,
    gaussian_adapter_noise,
    scale_active_adapter,
    strip_prefix,
    task_vector_norm,
    unwrap,
)
from .perturb import noise_seed, sample_branch

TRAINER_EXTRA = "pm_hf_trainer.safetensors"  # beside a Trainer checkpoint: fully trained parameters, branch counts
CHECKPOINT_SHA256 = "pm_hf_sha256.json"  # written last into a Trainer checkpoint: the sha256 of each of its files
logger = logging.getLogger(__name__)


class PerturbationMixin:
    """Perturb-and-Merge training (docs/method.md, stage 1) for any `transformers.Trainer` subclass: put it first,
    `class MyTrainer(PerturbationMixin, SomeTrainer)`, and give `args` the `PerturbationArguments` fields (`PMConfig`,
    or `pm_hf.trl.PMSFTConfig` for TRL's `SFTTrainer`).

    Args:
        *args, **kwargs: as the Trainer's.
        task_index: 0-based index of the task in the continual sequence (seeds the branch draws).
        head_modules: names (relative to the base model) of the class head(s); with `args.head_learning_rate` set,
            their parameters train at that learning rate (the paper's protocol: LoRA 1e-3, head 1e-2).
        step_offset: the optimizer steps of the sequence's earlier tasks: logs are reported at offset + global_step.
    """

    def __init__(self, *args, task_index: int = 0, head_modules: list[str] | None = None, step_offset: int = 0,
                 **kwargs):  # fmt: skip
        self.head_modules, self.step_offset = list(head_modules or []), step_offset
        given = kwargs.get("args", args[1] if len(args) > 1 else None)  # checked before the Trainer makes output_dir
        if not isinstance(given, PerturbationArguments):
            fix = f"{type(self).__name__} needs the perturbation fields: give a PMConfig"
            fix += " (PMSFTTrainer: pm_hf.method.sft.PMSFTConfig)."
            raise invalid("args", type(given).__name__, fix)
        if isinstance(task_index, bool) or not isinstance(task_index, int) or task_index < 0:
            raise invalid("task_index", task_index, "use the 0-based index of the task in the sequence.")
        super().__init__(*args, **kwargs)
        if self.args.perturbation != "none":  # its LoRA adapter (TRL's trainers wrap the model in their __init__)
            active_layers(self.model)
        self.task_index = task_index
        if self.model_accepts_loss_kwargs and not _loss_uses_num_items(self.model):
            # transformers#47688: heads that take **kwargs but compute a plain mean loss (BERT/ViT classifiers)
            # would otherwise skip the 1/gradient_accumulation_steps normalisation, making batch 4 x accumulation 2
            # train with twice the gradient of batch 8 x accumulation 1.
            self.model_accepts_loss_kwargs = False
        self.branch_counts: Counter[int] = Counter()
        self._late_losses: dict[int, list[float]] = {-1: [], 0: [], 1: []}
        self._counted_step = -1
        self._first_loss: list[float] | None = None  # per process

    def create_optimizer(self, *args, **kwargs):
        """`Trainer.create_optimizer`, then the head parameters moved to their own group at `head_learning_rate`."""
        optimizer = super().create_optimizer(*args, **kwargs)
        lr = self.args.head_learning_rate
        if lr is None or not self.head_modules:
            return optimizer
        head = {
            id(p)
            for n, p in self.model.named_parameters()
            if p.requires_grad and any(strip_prefix(n).startswith(h + ".") for h in self.head_modules)
        }
        moved = []
        for group in optimizer.param_groups:
            params = [p for p in group["params"] if id(p) in head]
            if params:
                group["params"] = [p for p in group["params"] if id(p) not in head]
                moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": params, "lr": lr})
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
        for group in moved:
            optimizer.add_param_group(group)
        return optimizer

    def current_branch(self) -> int:
        """The branch of the current optimizer step (0 when perturbation is off)."""
        if self.args.perturbation == "none" or self.args.perturb_eps == 0:
            return 0
        return sample_branch(self.args.seed, self.task_index, self.state.global_step, self.args.perturb_probs)

    def perturbation(self, branch: int):
        """Context in which the model is evaluated at the step's perturbed point."""
        if branch == 0:
            return contextlib.nullcontext()
        if self.args.perturbation == "gaussian":
            seed = noise_seed(self.args.seed, self.task_index, self.state.global_step)
            return gaussian_adapter_noise(self.model, self.args.perturb_eps, branch, seed)
        return scale_active_adapter(self.model, 1.0 + branch * self.args.perturb_eps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss` plus, in training, every `LossTerm` among the callbacks (a strategy's regulariser,
        e.g. O-LoRA's)."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        terms = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LossTerm)]
        if not terms or not model.training:
            return out
        loss, rest = (out[0], out[1:]) if return_outputs else (out, ())
        loss = loss + sum(term(model) for term in terms)
        return (loss, *rest) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        branch = self.current_branch()
        if self.state.global_step != self._counted_step:  # count once per optimizer step, not per micro-batch
            self._counted_step = self.state.global_step
            self.branch_counts[branch] += 1
        with self.perturbation(branch):
            loss = super().training_step(model, inputs, num_items_in_batch)
        value = float(loss)  # the Trainer syncs on this loss anyway (its NaN filter)
        self._check_loss(value)
        if 2 * self.state.global_step >= self.state.max_steps:  # the second half of the task's steps
            self._late_losses[branch].append(value)
        return loss

    def branch_losses(self) -> dict[int, float | None]:
        """The mean training loss of each branch b over the second half of the task's steps (the micro-batch losses as
        the Trainer returns them), None for a branch never drawn there: L_minus at (1 - eps) Delta, L_0 at Delta.
        Averaged over all processes, so every rank computes the same alpha from them."""
        sums = torch.tensor([[sum(v), len(v)] for v in self._late_losses.values()], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            backend_device = self.args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            sums = sums.to(backend_device)
            torch.distributed.all_reduce(sums)
        return {b: float(s / n) if n else None for b, (s, n) in zip(self._late_losses, sums.cpu().tolist())}

    def _check_loss(self, value: float) -> None:
        """Stop at a NaN/inf loss or one that exploded (`divergence_threshold` x max(1, the task's first loss)), on
        any process: every rank sees every rank's loss and stops at the same step (a rank stopping alone would leave
        the others waiting in their next collective)."""
        device = self.args.device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        losses = per_process(value, device)
        if self._first_loss is None:
            self._first_loss = losses
        limit = self.args.divergence_threshold
        for rank, (loss, first) in enumerate(zip(losses, self._first_loss)):
            exploded = limit is not None and loss > limit * max(1.0, abs(first))
            if math.isfinite(loss) and not exploded:
                continue
            where = f" on process {rank}" if len(losses) > 1 else ""
            raise DivergenceError(
                f"training diverged in task {self.task_index} at optimizer step {self.state.global_step + 1}{where}: "
                f"loss = {loss:.4g} (first loss of the task {first:.4g}); lower learning_rate and start the run "
                "again (the checkpoint of the previous task is intact)."
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (the adapter; under FSDP the Trainer saves the sharded model beside it), then, for a
        checkpoint, what else a mid-task resume needs: the fully trained parameters (the head, `modules_to_save`),
        whole (not under DeepSpeed: its own checkpoint holds them), and this trainer's branch counts and late branch
        losses. Every rank calls it (FSDP gathers)."""
        super().save_model(output_dir, _internal_call)
        if output_dir is None or not _internal_call:
            return
        trained = {} if BACKEND.checkpoint_holds_trained_params(self) else full_trainable_params(self.model)
        tensors = {k: v.cpu().contiguous() for k, v in placement_of(self.model).gather(trained).items()}
        late = every_process(self._late_losses)  # each process's own losses: their sums make L_minus and L_0
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)  # under FSDP with sharded state dicts the Trainer writes it later
            meta = {"branch_counts": json.dumps(self.branch_counts), "late_losses": json.dumps(late)}
            save_file(
                {k: v.detach() for k, v in tensors.items()}, os.path.join(output_dir, TRAINER_EXTRA), metadata=meta
            )

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, then, once every process has written its part, the sha256 of each file the
        checkpoint holds, written last: a resume takes only a checkpoint whose files match it (`task_checkpoint`)."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            digests = tree_digests(folder, skip=CHECKPOINT_SHA256)
            atomic_write_text(folder / CHECKPOINT_SHA256, json.dumps({"sha256": digests}, indent=1))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; a resumed task first gets back the branch counts and late branch losses `save_model` kept
        (here, not in `_load_from_checkpoint`: under DeepSpeed the Trainer loads DeepSpeed's checkpoint instead)."""
        path = resume_from_checkpoint
        if path is True:  # the Trainer's own search (it raises when there is none)
            from transformers.trainer_utils import get_last_checkpoint

            path = get_last_checkpoint(self.args.output_dir)
        if path:
            with safe_open(os.path.join(path, TRAINER_EXTRA), framework="pt") as f:
                meta = f.metadata()
            self.branch_counts = Counter({int(b): n for b, n in json.loads(meta["branch_counts"]).items()})
            self._late_losses = own_late_losses(json.loads(meta["late_losses"]), self.args)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """`Trainer._load_from_checkpoint` (the adapter), then the fully trained parameters `save_model` added (under
        DeepSpeed, its own checkpoint holds them)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TRAINER_EXTRA)
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model = model if model is not None else self.model
        params, place = full_trainable_params(model), placement_of(model)
        if set(params) != set(tensors):
            raise ValueError(f"{path} does not fit the model: {sorted(set(params) ^ set(tensors))[:3]}")
        with torch.no_grad():
            for key, value in tensors.items():
                params[key].copy_(place.shard_like(value.to(params[key].dtype), params[key]))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self.args.perturbation != "none":
            logs = dict(logs)
            for branch, label in ((-1, "minus"), (0, "zero"), (1, "plus")):
                logs[f"pm/branch_{label}"] = self.branch_counts[branch]
            logs["pm/delta_norm"] = task_vector_norm(self.model)
        self.state.global_step += self.step_offset  # the sequence's step: it never goes back from task to task
        try:
            super().log(logs, *args, **kwargs)
        finally:
            self.state.global_step -= self.step_offset


def log_evaluation(trainer, metrics: dict) -> None:
    """Report `metrics` the way `Trainer.evaluate` does, from a Trainer that has trained: as `eval_<key>` (the trackers
    file them under eval/), logged, then every callback's `on_evaluate`, at the sequence's step. None and NaN values
    (a task without an eval split) are left out."""
    nan = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    metrics = {f"eval_{k}": v for k, v in metrics.items() if not nan(v)}
    trainer.log(metrics)
    if not hasattr(trainer, "callback_handler"):  # a stand-in for a task's Trainer (`pm_hf.run.posthoc`): no callbacks
        return
    trainer.state.global_step += trainer.step_offset
    try:
        control = trainer.callback_handler.on_evaluate(trainer.args, trainer.state, trainer.control, metrics=metrics)
        trainer.control = control
    finally:
        trainer.state.global_step -= trainer.step_offset


def own_late_losses(saved: list[dict] | dict, args) -> dict[int, list[float]]:
    """This process's late branch losses from a checkpoint's list of every process's: its own with as many
    processes as saved them, else all of them on the main process and none elsewhere (the sums that make the branch
    means are kept either way). A dict: a checkpoint written by one process."""
    saved = [saved] if isinstance(saved, dict) else saved
    if len(saved) == args.world_size:
        mine = saved[args.process_index]
    else:
        mine = {b: [v for part in saved for v in part[b]] for b in saved[0]} if args.process_index == 0 else {}
    return {b: list(mine.get(str(b), mine.get(b, []))) for b in (-1, 0, 1)}


class LossTerm(TrainerCallback):
    """A term added to every training loss of the Trainers it is a callback of (`PerturbationMixin.compute_loss`):
    `term(model)` returns a scalar tensor differentiable in the trained parameters. A strategy hands its terms to the
    loop through `MergeStrategy.callbacks`."""

    def __call__(self, model) -> torch.Tensor:
        raise NotImplementedError


class TaskProgress(TrainerCallback):
    """The training bar of one task, nested under the bar over tasks and gone when the task ends; the latest loss
    is shown on it (the logs themselves go to `report_to`)."""

    def __init__(self, task_index: int):
        self.task_index, self.bar = task_index, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=f"task {self.task_index}", leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4g}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PMTrainer(PerturbationMixin, Trainer):
    """`transformers.Trainer` with Perturb-and-Merge training: `args` is a `PMConfig` (see `PerturbationMixin`)."""


def _loss_uses_num_items(model) -> bool:
    """Whether the wrapped model's forward passes `num_items_in_batch` on to its loss (via `self.loss_function`)."""
    base = unwrap(model)
    base = getattr(base, "get_base_model", lambda: base)()
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return True  # cannot tell: keep the Trainer's own decision
    return "loss_function" in source or "num_items_in_batch" in source


def task_checkpoint(out: Path, t: int) -> str | None:
    """The newest complete Trainer checkpoint of task t whose files match the sha256 written last into it, if any;
    a newer one that does not (a save cut short, a damaged file, or one of pm_hf 0.3 or older) is passed over with a
    warning: the task resumes from the one before it, or from its start, to the same numbers."""
    folder = out / "tasks" / f"task_{t}"
    steps = sorted(
        folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name[11:].isdigit() else -1
    )
    for path in reversed(steps):
        problem = _checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("--resume: task %d's %s is not used (%s); it resumes from an earlier point.", t, path, problem)
    return None


def _checkpoint_problem(path: Path) -> str | None:
    if not (path / "trainer_state.json").is_file() or not (path / TRAINER_EXTRA).is_file():
        return "incomplete"
    try:
        recorded = json.loads((path / CHECKPOINT_SHA256).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {CHECKPOINT_SHA256}: its save did not finish"
    found = tree_digests(path, skip=CHECKPOINT_SHA256)
    changed = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
    return f"{', '.join(changed[:3])} not as saved (sha256)" if changed else None
