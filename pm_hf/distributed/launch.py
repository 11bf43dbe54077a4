"""How a continual run is launched on several processes (`accelerate launch`, `torchrun`) and what pm_hf accepts.

- DDP: every rank holds the whole model and the whole continual state.
- FSDP2 (`configs/accelerate/fsdp.yaml`): the weights are sharded, and so is everything pm_hf keeps beside them
  (`pm_hf.distributed.sharding`), a classifier's head too; the root module reshards between tasks (`root_reshards`).
- DeepSpeed ZeRO stages 0-2 (`configs/accelerate/zero2.yaml`): the optimizer state (and with stage 2 the gradients)
  are partitioned, the weights stay whole on every rank, so pm_hf's own state (S, G, master, Fisher) is whole too,
  as under DDP. Each task's Trainer builds a DeepSpeed engine for that task's adapter and optimizer; it is destroyed
  when the task's training ends (its gradient hooks removed) before the Fisher, the merge and the next task's engine.
- DeepSpeed ZeRO-3 (`configs/accelerate/zero3.yaml`): the weights are partitioned; pm_hf reads each rank's partition
  as FSDP2's rows (`pm_hf.distributed.zero3`), so its state is divided by the ranks as under FSDP2, with the same
  limits (`pm_hf.distributed.limits`). Between tasks ZeRO-3's parameter hooks without an optimizer run the forward
  passes (Fisher, evaluation).

Everything else is refused before anything is loaded (`refuse_sharding`), or once the Trainer is built where only the
Trainer knows (`AccelerateBackend.check_prepared`): never a silent fallback to DDP. Each task's Trainer goes through
one `AccelerateBackend` (`BACKEND`): built, checked, its training, its release.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager

from transformers import Trainer

from ..errors import invalid
from . import private
from .placement import detect
from .sharding import root_reshards
from .zero3 import attach_hooks, detach_hooks

ZERO3_DEFAULTS = {  # the ZeRO-3 settings pm_hf runs with, as DeepSpeed's defaults
    "zero_hpz_partition_size": (1, None),
    "mics_shard_size": (-1, 0, None),
    "zero_quantized_weights": (False, None),
    "zero_quantized_nontrainable_weights": (False, None),
}
PERSIST_FIX = (
    "set `zero_optimization.stage3_param_persistence_threshold` to 0 (configs/deepspeed/zero3.json): pm_hf writes "
    "merged weights into the partitions, which a persistent (never partitioned) parameter does not read back."
)
CPU_FIX = "would run this as plain DDP on CPU: launch on GPUs, or use DDP."
MIXED_FIX = (
    "DeepSpeed's mixed precision casts the whole model (frozen weights, head) to 16 bits in place, under pm_hf's "
    "merges: leave it off (`mixed_precision: no`, `bf16: false`) and load the model in bf16 with `dtype: bfloat16` "
    "(pm_hf keeps an fp32 master of the adapted weights)."
)


private.unwrap_without_importing_deepspeed()


def fsdp_requested(args) -> bool:
    """FSDP asked for in the training arguments or by `accelerate launch`'s config (as Accelerate reports it)."""
    from accelerate.utils import parse_flag_from_env

    return bool(args.fsdp) or parse_flag_from_env("ACCELERATE_USE_FSDP")


def partitions_weights(args) -> bool:
    """Whether the run's weights are sharded: FSDP (FSDP2), or DeepSpeed ZeRO-3."""
    return fsdp_requested(args) or zero_stage(args) == 3


def sharding_field(args) -> tuple[str, object]:
    """The field and value a refusal of a sharded run names."""
    if fsdp_requested(args):
        return "fsdp", args.fsdp or "accelerate config (FSDP)"
    return "deepspeed", args.deepspeed if isinstance(args.deepspeed, str) else "DeepSpeed config (ZeRO-3)"


def refuse_any_launch_mode(args, fix: str) -> None:
    """Refuse FSDP and DeepSpeed (any ZeRO stage) for a command that trains nothing (`pm-hf merge`)."""
    if zero_stage(args) is not None or fsdp_requested(args):
        raise invalid(*sharding_field(args) if fsdp_requested(args) else ("deepspeed", "DeepSpeed config"), fix)


def fsdp_plugin(args):
    """The FSDP settings the run's Trainer will use: from the training arguments, or `accelerate launch`'s config."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**(args.fsdp_plugin_args or {}) if args.fsdp else {})


def deepspeed_config(value) -> dict:
    """A DeepSpeed config given as a dict or a JSON file's path (`TrainingArguments.deepspeed`)."""
    if isinstance(value, dict):
        return value
    try:
        with open(value) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise invalid("deepspeed", value, f"not a readable DeepSpeed JSON config ({err}).") from err


def check_deepspeed_config(config: dict, asked) -> int:
    """The ZeRO stage of a DeepSpeed config pm_hf runs (0-3), or the field refused: an `optimizer` or `scheduler`
    section (every task's Trainer builds its own: the head's learning rate, the task's schedule), mixed precision,
    and with ZeRO-3 persistent parameters."""
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if str(stage) not in ("0", "1", "2", "3"):
        raise invalid("deepspeed", f"{asked} (zero_optimization.stage {stage})", "give the ZeRO stage as 0 to 3.")
    if str(stage) == "3":
        check_zero3_layout(zero, asked)
    for section in ("optimizer", "scheduler"):
        if section in config:
            fix = f"remove the `{section}` section: every task's Trainer builds its own (TrainingArguments' fields)."
            raise invalid("deepspeed", f"{asked} ({section})", fix)
    for section in ("bf16", "fp16"):
        if config.get(section, {}).get("enabled", False) not in (False, "false", "auto"):
            raise invalid("deepspeed", f"{asked} ({section}.enabled)", MIXED_FIX)
    return int(stage)


def check_zero3_layout(zero: dict, asked) -> None:
    """ZeRO-3 settings under which a rank's partition of a weight is not its plain rows in `ds_tensor` (what
    `pm_hf.distributed.zero3` reads and writes) are refused: persistent parameters, offloaded parameters, secondary
    (hpZ) or MiCS
    partitions, quantized weights."""
    threshold = zero.get("stage3_param_persistence_threshold")
    if str(threshold) != "0":
        raise invalid("deepspeed", f"{asked} (stage3_param_persistence_threshold {threshold})", PERSIST_FIX)
    settings = {"offload_param.device": (zero.get("offload_param") or {}).get("device", "none")}
    settings.update({field: zero.get(field, allowed[0]) for field, allowed in ZERO3_DEFAULTS.items()})
    for field, value in settings.items():
        if value not in ZERO3_DEFAULTS.get(field, ("none", None)):
            fix = "pm_hf writes merges into each rank's partition of a weight, which this setting moves or re-encodes: "
            raise invalid("deepspeed", f"{asked} ({field} {value})", fix + "leave it at its default with ZeRO-3.")


def zero_stage(args) -> int | None:
    """The ZeRO stage a run asks for (None without DeepSpeed): from the training arguments' DeepSpeed config, or
    `accelerate launch`'s (its `zero_stage`, or the stage in its `deepspeed_config_file`)."""
    from accelerate.utils import parse_flag_from_env

    if args.deepspeed:
        asked = args.deepspeed if isinstance(args.deepspeed, str) else "deepspeed config"
        return check_deepspeed_config(deepspeed_config(args.deepspeed), asked)
    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    from accelerate.utils import DeepSpeedPlugin  # reads `accelerate launch`'s settings and config file

    return check_deepspeed_config(DeepSpeedPlugin().deepspeed_config, "accelerate config")


def accelerate_runs_on(args, kind: str) -> bool:
    """Whether Accelerate runs an FSDP / DeepSpeed config as such on this run's device: on accelerators only (on CPU
    it would silently run plain DDP), unless the backend was told Accelerate runs `kind` on CPU
    (`AccelerateBackend.run_on_cpu`, which a caller that makes it so says explicitly)."""
    return args.device.type != "cpu" or kind in BACKEND.cpu_kinds


def refuse_sharding(args) -> None:
    """Refused before anything is loaded: a launch whose processes would each train alone (`torchrun` on a machine
    without a GPU and without `use_cpu`); DeepSpeed configs pm_hf cannot run; FSDP other than FSDP2; FSDP or
    DeepSpeed where Accelerate would not run it (CPU). What a run with sharded weights (FSDP2, ZeRO-3) supports beyond
    that is checked before the model is loaded (`pm_hf.distributed.limits`)."""
    from accelerate.utils import get_int_from_env

    launched = get_int_from_env(["WORLD_SIZE"], 1)  # the processes `torchrun` / `accelerate launch` started
    if launched > 1 and args.world_size != launched:
        fix = (
            f"launched with {launched} processes but the training arguments see {args.world_size}: every process "
            "would train alone and write the same files. On a machine without a GPU set `use_cpu: true` (gloo)."
        )
        raise invalid("use_cpu", args.use_cpu, fix)
    if zero_stage(args) is not None:
        refuse_deepspeed(args)
    if fsdp_requested(args):
        refuse_fsdp(args)


def refuse_deepspeed(args) -> None:
    from accelerate.utils import parse_choice_from_env

    asked = args.deepspeed if isinstance(args.deepspeed, str) else "DeepSpeed config"
    if not accelerate_runs_on(args, "deepspeed"):
        raise invalid("deepspeed", asked, "Accelerate runs DeepSpeed on GPUs only and " + CPU_FIX)
    for field in ("bf16", "fp16"):
        if getattr(args, field):
            raise invalid(field, True, "with DeepSpeed: " + MIXED_FIX)
    mixed = parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch`'s mixed_precision
    if mixed != "no" and not args.deepspeed:
        raise invalid("mixed_precision", mixed, "in the accelerate config, with DeepSpeed: " + MIXED_FIX)


def refuse_fsdp(args) -> None:
    asked = args.fsdp or "accelerate config (FSDP)"
    plugin = fsdp_plugin(args)
    if plugin.fsdp_version != 2:
        raise invalid(
            "fsdp", asked, "pm_hf shards with FSDP2 only: set `fsdp_version: 2` (configs/accelerate/fsdp.yaml)."
        )
    if not accelerate_runs_on(args, "fsdp"):
        raise invalid("fsdp", asked, "Accelerate runs FSDP on GPUs only and " + CPU_FIX)
    save = getattr(args.save_strategy, "value", args.save_strategy)
    if save != "no" and "FULL_STATE_DICT" in str(plugin.state_dict_type):
        fix = (
            f"mid-task checkpoints (save_strategy {save!r}) under FSDP are written as sharded state dicts: set "
            "`state_dict_type: SHARDED_STATE_DICT` (configs/accelerate/fsdp.yaml), or `save_strategy: no`."
        )
        raise invalid("fsdp_config", "FULL_STATE_DICT", fix)


class AccelerateBackend:
    """The lifecycle of each task's Trainer under Accelerate (DDP, FSDP2, DeepSpeed): what comes off the model before a
    task's Trainer prepares it again, the check that it really runs as asked, the task's engine released when its
    training ends (ZeRO-3's between-task hooks attached instead), the one DeepSpeed plugin the tasks share, and the
    launch as results.json records it. One per process (`BACKEND`): Accelerate's own state is per process."""

    def __init__(self) -> None:
        self.cpu_kinds: set[str] = set()  # FSDP / DeepSpeed configs Accelerate was made to run on CPU

    def run_on_cpu(self, kind: str) -> None:
        """Say that Accelerate runs `kind` ('fsdp' or 'deepspeed') as such on CPU (tests: `pm_hf.testing`)."""
        self.cpu_kinds.add(kind)

    def before_task_trainer(self, model, args) -> None:
        """Before a task's Trainer is built: the model is wrapped for training again (Accelerate skips a model it
        prepared for evaluation), the DeepSpeed plugin is shared, ZeRO-3's between-task hooks come off (the task's
        engine installs its own) and an FSDP2 root keeps its weights whole after forward again."""
        private.forget_accelerate_prepared(model)
        self.share_deepspeed_plugin(args)
        self.end_between_tasks(model)

    def end_between_tasks(self, model) -> None:
        """What held the model between tasks comes off: ZeRO-3's parameter hooks without an optimizer; an FSDP2 root
        goes back to keeping its weights whole after forward (training's backward needs them at once)."""
        detach_hooks(model)
        root_reshards(model, between_tasks=False)

    def check_prepared(self, trainer) -> None:
        """After a task's Trainer is built: an FSDP / DeepSpeed run really runs as such (never a silent fallback to
        DDP), with a ZeRO stage pm_hf supports, and a model already sharded by an earlier task's Trainer is not
        wrapped again (one model preparation per run)."""
        from accelerate.utils import DistributedType

        kind = trainer.accelerator.distributed_type
        if zero_stage(trainer.args) is not None or trainer.is_deepspeed_enabled:
            if kind != DistributedType.DEEPSPEED:
                fix = f"Accelerate set the run up as {kind.value}."
                raise invalid("deepspeed", "accelerate config (DeepSpeed)", fix)
            zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            check_deepspeed_config({"zero_optimization": zero}, "the DeepSpeed config Accelerate runs")
        if not fsdp_requested(trainer.args):
            return
        if kind != DistributedType.FSDP:
            raise invalid("fsdp", trainer.args.fsdp or "accelerate config (FSDP)",
                          f"Accelerate set the run up as {kind.value}, not FSDP: launch on GPUs.")  # fmt: skip
        if detect(trainer.model).name != "none":  # already sharded: Accelerate's prepare keeps it as it is
            trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = None

    def share_deepspeed_plugin(self, args) -> None:
        """Before a later Trainer: Accelerate keeps one DeepSpeed plugin per process (a second Accelerator may not
        bring its own), so the Trainer's copy of the arguments leaves it out and Accelerate reuses the first's."""
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        if not private.accelerator_state_exists() or AcceleratorState().distributed_type != DistributedType.DEEPSPEED:
            return
        shared, own = AcceleratorState().deepspeed_plugin, args.deepspeed_plugin
        if own is not None and (own.zero_stage, own.offload_optimizer_device) != (
            shared.zero_stage,
            shared.offload_optimizer_device,
        ):
            fix = "this process already runs another DeepSpeed config (Accelerate keeps one): run it in a new process."
            raise invalid("deepspeed", args.deepspeed, fix)
        args.deepspeed_plugin = None

    def checkpoint_holds_trained_params(self, trainer) -> bool:
        """Whether a mid-task checkpoint of the Trainer's own already holds the fully trained parameters (DeepSpeed's
        engine saves and loads its whole module)."""
        return bool(trainer.is_deepspeed_enabled)

    def predicting(self, trainer):
        """A Trainer that only predicts runs the plain model under DeepSpeed (ZeRO 0-2: whole weights on every rank;
        ZeRO-3: the between-task hooks gather them module by module) rather than asking DeepSpeed for an engine."""
        trainer.is_deepspeed_enabled = False
        return trainer

    @contextmanager
    def training(self, trainer) -> Iterator[None]:
        """A task's training, its trainer released when it ends (`release`); also when it stops with an error, which
        then propagates as it is (ZeRO-3's hooks are not attached again: nothing runs after)."""
        try:
            yield
        except BaseException:
            self.release(trainer, attach=False)
            raise
        self.release(trainer)

    def release(self, trainer, attach: bool = True) -> None:
        """Drop a task's trainer's hold on the model once its training ends: the DeepSpeed engine is destroyed (its
        gradient hooks would otherwise fire in the Fisher's backward passes and in the next task's; under ZeRO-3 the
        parameter hooks without an optimizer are attached instead), and the accelerator's references (the DDP
        wrapper, the optimizer) are freed before the next task's trainer prepares the model again."""
        if not isinstance(trainer, Trainer):
            return
        engine = getattr(trainer, "deepspeed", None)
        if engine is not None:
            engine.destroy()  # removes its gradient hooks, not the forward hooks it put on the model
            private.remove_engine_forward_hooks(engine)
            trainer.deepspeed = None
            if attach and engine.zero_optimization_partition_weights():  # ZeRO-3: they still need gathering
                attach_hooks(engine.module, engine)
        root_reshards(trainer.model, between_tasks=True)  # FSDP2: the root's weights sharded, as pm_hf reads them
        trainer.accelerator.free_memory()
        trainer.model_wrapped = trainer.model
        trainer.optimizer = trainer.lr_scheduler = trainer.callback_handler.optimizer = None
        trainer.callback_handler.lr_scheduler = None
        gc.collect()

    def describe(self, args, model=None) -> dict:
        """How the run actually ran: Accelerate's distributed type, the number of processes, and the sharding
        ('fsdp2' for sharded weights, 'zero<stage>' for DeepSpeed's partitioned optimizer state)."""
        from accelerate import PartialState
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType

        state = PartialState()
        sharding = detect(model).name if model is not None else "none"
        kind = "FSDP" if sharding == "fsdp2" else state.distributed_type.value
        if private.accelerator_state_exists() and AcceleratorState().distributed_type == DistributedType.DEEPSPEED:
            kind, sharding = "DEEPSPEED", f"zero{AcceleratorState().deepspeed_plugin.zero_stage}"
        return {"type": kind, "num_processes": state.num_processes, "sharding": sharding}


BACKEND = AccelerateBackend()
task_training = BACKEND.training  # `with task_training(trainer):` a task's training, its trainer released after
