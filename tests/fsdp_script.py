"""Run under `torchrun --nproc_per_node 2` by the tests (or alone, for the 1-process reference): a 2-task continual
instruction run of the tiny Llama on CPU processes (gloo), sharded by FSDP2 with `sharded` (see
`pm_hf.testing.fsdp_on_cpu`). Each process writes to OUT/rank<r>.json its alphas, delta norms, score matrices, the
run's `distributed` record and the fraction of the continual state (S, G) its own shards hold; the checkpoint and
the export are in OUT/run as usual.

    python tests/fsdp_script.py LLM_DIR OUT PER_DEVICE_BATCH [sharded | zero2 | zero3] [resume | crash | continue]
        [launcher] [k=v ...]

`resume`: stopped after task 1, then resumed in the same processes. `crash`: checkpoints every step and is killed
(an exception on every rank) at step 2 (`kill_at=N`: step N) of task 2, then writes only OUT/crashed<r>.json with
the task's newest checkpoint; `continue` resumes that run. `launcher`: the FSDP / DeepSpeed setup comes from
`accelerate launch --config_file configs/accelerate/fsdp.yaml` (or zero2.yaml; its environment) instead of the
training arguments.
`zero2`, `zero3`: DeepSpeed ZeRO-2 or ZeRO-3 instead of FSDP2 (see `pm_hf.testing.deepspeed_on_cpu`).
"""

import gc
import json
import sys
import weakref
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ZERO2, ZERO3, end_processes, llm_groups  # noqa: E402  (sets the offline switches first)
from transformers import TrainerCallback  # noqa: E402

from pm_hf.continual import ContinualTrainer  # noqa: E402
from pm_hf.distributed.launch import BACKEND  # noqa: E402
from pm_hf.distributed.sharding import local_rows  # noqa: E402
from pm_hf.method.trainer import task_checkpoint  # noqa: E402
from pm_hf.testing import deepspeed_on_cpu, fsdp_on_cpu  # noqa: E402

FSDP = {
    "fsdp": "full_shard",
    "fsdp_config": {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        "state_dict_type": "SHARDED_STATE_DICT",
    },
}


class Kill(Exception):
    pass


class KillAt(TrainerCallback):
    """Raises at optimizer step `step` of the second task's training, on every rank (a kill in the middle of a task).
    Keeps weak references to every task's optimizer (a released task leaves none alive)."""

    def __init__(self, step: int | None = 2):
        self.trainers, self.step, self.optimizers = 0, step, []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        self.trainers += 1
        self.optimizers.append(weakref.ref(getattr(optimizer, "optimizer", optimizer)))  # inside Accelerate's wrapper

    def on_step_end(self, args, state, control, **kw):
        if self.trainers == 2 and state.global_step == self.step:
            raise Kill


class FirstSteps(TrainerCallback):
    """The optimizer step each task's training starts from (> 0 when it resumed a mid-task checkpoint)."""

    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, **kw):
        self.steps.append(state.global_step)


def forward_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def live(refs) -> int:
    gc.collect()
    return sum(ref() is not None for ref in refs)


def main(model_dir: str, out: str, batch: int, flags: list[str]) -> None:
    if "sharded" in flags or "launcher" in flags:
        fsdp_on_cpu()
    if {"zero2", "zero3", "launcher"} & set(flags):
        deepspeed_on_cpu()
    extra = {"sharded": FSDP, "zero2": {"deepspeed": ZERO2}, "zero3": {"deepspeed": ZERO3}}
    extra = {} if "launcher" in flags else next((extra[f] for f in flags if f in extra), {})
    saves = {"save_strategy": "steps", "save_steps": 1} if {"crash", "continue"} & set(flags) else {}
    options = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in flags if "=" in f)}  # e.g. dtype=bfloat16
    step = options.pop("kill_at", 2)
    kill = KillAt(step if "crash" in flags else None)  # None: never kills
    args = llm_groups(model_dir, Path(out) / "run", per_device_train_batch_size=batch, logging_steps=1,
                      **{"save_strategy": "no", **saves, **options}, **extra)  # fmt: skip
    rank = args[2].process_index
    if "crash" in flags:
        try:
            ContinualTrainer.from_args(*args, callbacks=[kill]).train()
        except Kill:
            found = task_checkpoint(Path(out) / "run", 1)
            (Path(out) / f"crashed{rank}.json").write_text(json.dumps({"checkpoint": found}))
        return
    if "resume" in flags:
        ContinualTrainer.from_args(*args).train(stop_after=1)
    first = FirstSteps()
    trainer = ContinualTrainer.from_args(*args, callbacks=[first, kill])  # kill: its optimizer references only
    results = trainer.train(resume_from_checkpoint=bool({"resume", "continue"} & set(flags))).results
    strategy, weights = trainer.loop.strategy, trainer.loop.weights
    state = [*getattr(strategy, "S", {}).values(), *getattr(strategy, "G", {}).values(), *weights.master.values()]
    held = sum(local_rows(t).numel() for t in state) / max(1, sum(t.numel() for t in state))
    record = {"alphas": results["alphas"], "delta_norms": results["delta_norms"], "state_fraction": held,
              "scores": results["score_matrices"], "distributed": results.get("distributed"),
              "first_steps": first.steps, "branch_counts": results["branch_counts"],
              "branch_losses": results["branch_losses"], "forward_hooks": forward_hooks(trainer.loop.model),
              "live_optimizers": live(kill.optimizers)}  # fmt: skip
    BACKEND.end_between_tasks(trainer.loop.model)  # what a next task's Trainer would do first
    record["hooks_left"] = forward_hooks(trainer.loop.model)  # ZeRO-3: the between-task hooks are gone too
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    end_processes()
