"""Run under `torchrun --nproc_per_node 2` by the tests (or alone, for the 1-process reference): a 3-task continual
run of the tiny BERT on CPU processes (gloo), optionally pushing to a recording stand-in of the Hub. Each process
writes what it saw to OUT/rank<r>.json: its alphas, score matrices, Hub calls and the fraction of the continual state
(S, G) it holds, and (rank 0) the checkpoint's merged weights sit in OUT/run as usual.

    python tests/ddp_script.py MODEL_DIR OUT PER_DEVICE_BATCH [push | poison | zero2 | zero3 | sharded]
        [crash | continue] [api] [k=v ...]

`poison`: process 1 alone gets NaN adapter weights after step 1 of task 2 (its loss alone is NaN at step 2); each
process writes OUT/diverged<r>.json with the error it stopped on and the tasks its checkpoint holds. `zero2`: under
DeepSpeed ZeRO-2 (its CPU accelerator; see `pm_hf.testing.deepspeed_on_cpu`). `sharded`: under FSDP2 (see
`pm_hf.testing.fsdp_on_cpu`), the tiny BERT's layers and its root (embeddings, pooler, head) sharded. `k=v`: any
field of the run's arguments (`head_align=prototypes`). `crash`: killed (an exception on every rank) at step `kill_at=N`
(2) of task 2, writes only OUT/crashed<r>.json with the task's newest checkpoint (give `save_strategy=steps
save_steps=1`); `continue` resumes that run. `api`: the run built by the Python API from class-incremental tasks given
as datasets (`api_classes=[[0, 1], [2, 3]]`).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import yaml  # noqa: E402
from conftest import ZERO2, ZERO3, end_processes, groups  # noqa: E402  (sets the offline switches first)
from fsdp_script import FirstSteps, Kill, KillAt  # noqa: E402
from hub_standin import GOOD_TOKEN, FakeHub  # noqa: E402
from test_api import task  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import pm_hf.hub.repository  # noqa: E402
from pm_hf.continual import ContinualTrainer, run_continual  # noqa: E402
from pm_hf.distributed.sharding import local_rows  # noqa: E402
from pm_hf.method.trainer import DivergenceError, task_checkpoint  # noqa: E402
from pm_hf.testing import deepspeed_on_cpu, fsdp_on_cpu  # noqa: E402

FSDP = {
    "fsdp": "full_shard",
    "fsdp_config": {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["BertLayer"],
        "state_dict_type": "SHARDED_STATE_DICT",
    },
}


class PoisonRankOne(TrainerCallback):
    """NaN in process 1's LoRA B after optimizer step 1 of the second task (process 0 trains on, finite)."""

    def __init__(self):
        self.trainers = 0

    def on_train_begin(self, args, state, control, **kw):
        self.trainers += 1

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.trainers == 2 and state.global_step == 1 and args.process_index == 1:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(float("nan"))


def main(model_dir: str, out: str, batch: int, flags: list[str]) -> None:
    push, poison, zero2, zero3, sharded = (flag in flags for flag in ("push", "poison", "zero2", "zero3", "sharded"))
    options = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in flags if "=" in f)}  # e.g. head_align=seen
    kill_at = options.pop("kill_at", 2)
    api_classes = options.pop("api_classes", [[0, 1], [2, 3]])
    if zero2 or zero3:
        deepspeed_on_cpu()
    if sharded:
        fsdp_on_cpu()
    fake = FakeHub(cache_dir=Path(out) / "hub_cache")
    pm_hf.hub.repository.HfApi = fake.api
    hub = {"push_to_hub": True, "hub_model_id": "me/ddp", "hub_token": GOOD_TOKEN} if push else {}
    args = groups(model_dir, Path(out) / "run", per_device_train_batch_size=batch, **hub, **options,
                  **({"deepspeed": ZERO2} if zero2 else {"deepspeed": ZERO3} if zero3 else {}),
                  **(FSDP if sharded else {}))  # fmt: skip
    if poison:
        try:
            run_continual(*args, callbacks=[PoisonRankOne()])
        except DivergenceError as err:
            latest = json.loads((Path(out) / "run" / "latest.json").read_text())
            record = {"error": str(err), "completed": latest["completed"]}
            (Path(out) / f"diverged{args[2].process_index}.json").write_text(json.dumps(record))
        return
    if "crash" in flags:
        try:
            run_continual(*args, callbacks=[KillAt(kill_at)])
        except Kill:
            found = task_checkpoint(Path(out) / "run", 1)
            (Path(out) / f"crashed{args[2].process_index}.json").write_text(json.dumps({"checkpoint": found}))
        return
    first = FirstSteps()
    if "api" in flags:  # the Python API, every task given up front as datasets (the head sized by them all)
        tasks = [task(*classes) for classes in api_classes]
        trainer = ContinualTrainer(model=model_dir, args=args[2], tasks=tasks, lora_args=args[3], fisher_args=args[4],
                                   merge_args=args[5], callbacks=[first])  # fmt: skip
    else:
        trainer = ContinualTrainer.from_args(*args, callbacks=[first])
    results, strategy = trainer.train(resume_from_checkpoint="continue" in flags).results, trainer.loop.strategy
    state = [*strategy.S.values(), *strategy.G.values(), *trainer.loop.weights.master.values()]
    held = sum(local_rows(t).numel() for t in state) / sum(t.numel() for t in state)
    record = {"calls": [c[0] for c in fake.calls], "repos": sorted(fake.repos), "world_size": args[2].world_size,
              "alphas": results["alphas"], "delta_norms": results["delta_norms"], "state_fraction": held,
              "distributed": results.get("distributed"), "scores": results["score_matrices"],
              "first_steps": first.steps}  # fmt: skip
    (Path(out) / f"rank{args[2].process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    end_processes()
