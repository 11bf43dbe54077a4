"""Run under `torchrun --nproc_per_node 2` by tests/test_hub.py: a continual run on 2 CPU processes (gloo) pushing to
a recording stand-in of the Hub; each process writes what its own stand-in received to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import groups  # noqa: E402  (sets the offline switches first)
from hub_standin import GOOD_TOKEN, FakeHub  # noqa: E402

import pm_hf.hub  # noqa: E402
from pm_hf.continual import run_continual  # noqa: E402


def main(model_dir: str, out: str) -> None:
    fake = FakeHub(cache_dir=Path(out) / "hub_cache")
    pm_hf.hub.HfApi = fake.api
    args = groups(model_dir, Path(out) / "run", class_groups=[[0, 1], [2, 3]], push_to_hub=True,
                  hub_model_id="me/ddp", hub_token=GOOD_TOKEN, ddp_backend="gloo")  # fmt: skip
    results = run_continual(*args)
    rank = args[2].process_index
    record = {"calls": [c[0] for c in fake.calls], "repos": sorted(fake.repos), "world_size": args[2].world_size,
              "alphas": results["alphas"]}  # fmt: skip
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
