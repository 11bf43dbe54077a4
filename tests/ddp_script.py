"""Run under `torchrun --nproc_per_node 2` by the tests (or alone, for the 1-process reference): a 3-task continual
run of the tiny BERT on CPU processes (gloo), optionally pushing to a recording stand-in of the Hub. Each process
writes what it saw to OUT/rank<r>.json: its alphas, its Hub calls, and (rank 0) the checkpoint's merged weights sit
in OUT/run as usual.

    python tests/ddp_script.py MODEL_DIR OUT PER_DEVICE_BATCH [push]
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import groups  # noqa: E402  (sets the offline switches first)
from hub_standin import GOOD_TOKEN, FakeHub  # noqa: E402

import pm_hf.hub  # noqa: E402
from pm_hf.continual import run_continual  # noqa: E402


def main(model_dir: str, out: str, batch: int, push: bool) -> None:
    fake = FakeHub(cache_dir=Path(out) / "hub_cache")
    pm_hf.hub.HfApi = fake.api
    hub = {"push_to_hub": True, "hub_model_id": "me/ddp", "hub_token": GOOD_TOKEN} if push else {}
    args = groups(model_dir, Path(out) / "run", per_device_train_batch_size=batch, **hub)
    results = run_continual(*args)
    record = {"calls": [c[0] for c in fake.calls], "repos": sorted(fake.repos), "world_size": args[2].world_size,
              "alphas": results["alphas"], "delta_norms": results["delta_norms"],
              "distributed": results.get("distributed")}  # fmt: skip
    (Path(out) / f"rank{args[2].process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "push" in sys.argv[4:])
