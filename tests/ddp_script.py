"""Run under `torchrun --nproc_per_node 2` by the tests (or alone, for the 1-process reference): a 3-task continual
run of the tiny BERT on CPU processes (gloo), optionally pushing to a recording stand-in of the Hub. Each process
writes what it saw to OUT/rank<r>.json: its alphas, its Hub calls, and (rank 0) the checkpoint's merged weights sit
in OUT/run as usual.

    python tests/ddp_script.py MODEL_DIR OUT PER_DEVICE_BATCH [push | poison | zero2]

`poison`: process 1 alone gets NaN adapter weights after step 1 of task 2 (its loss alone is NaN at step 2); each
process writes OUT/diverged<r>.json with the error it stopped on and the tasks its checkpoint holds. `zero2`: under
DeepSpeed ZeRO-2 (its CPU accelerator; see `pm_hf.testing.deepspeed_on_cpu`).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from conftest import ZERO2, end_processes, groups  # noqa: E402  (sets the offline switches first)
from hub_standin import GOOD_TOKEN, FakeHub  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import pm_hf.hub  # noqa: E402
from pm_hf.continual import run_continual  # noqa: E402
from pm_hf.testing import deepspeed_on_cpu  # noqa: E402
from pm_hf.trainer import DivergenceError  # noqa: E402


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


def main(model_dir: str, out: str, batch: int, push: bool, poison: bool, zero2: bool) -> None:
    if zero2:
        deepspeed_on_cpu()
    fake = FakeHub(cache_dir=Path(out) / "hub_cache")
    pm_hf.hub.HfApi = fake.api
    hub = {"push_to_hub": True, "hub_model_id": "me/ddp", "hub_token": GOOD_TOKEN} if push else {}
    args = groups(model_dir, Path(out) / "run", per_device_train_batch_size=batch, **hub,
                  **({"deepspeed": ZERO2} if zero2 else {}))  # fmt: skip
    if poison:
        try:
            run_continual(*args, callbacks=[PoisonRankOne()])
        except DivergenceError as err:
            latest = json.loads((Path(out) / "run" / "latest.json").read_text())
            record = {"error": str(err), "completed": latest["completed"]}
            (Path(out) / f"diverged{args[2].process_index}.json").write_text(json.dumps(record))
        return
    results = run_continual(*args)
    record = {"calls": [c[0] for c in fake.calls], "repos": sorted(fake.repos), "world_size": args[2].world_size,
              "alphas": results["alphas"], "delta_norms": results["delta_norms"],
              "distributed": results.get("distributed")}  # fmt: skip
    (Path(out) / f"rank{args[2].process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *(flag in sys.argv[4:] for flag in ("push", "poison", "zero2")))
    end_processes()
