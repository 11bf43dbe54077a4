"""2 processes against 1 with the same global batch (docs/distributed.md, "DDP"): `configs/ci_tiny.yaml` (the tiny
BERT of data/tiny-bert, 2 tasks; `--num_tasks` for more) run by `torchrun --nproc_per_node 2` on CPU (gloo) with
per-device batch B and by one process with batch 2B; prints the largest |alpha difference| per task, the largest
relative difference of the merged weights (checkpoint `weights/`), and the setup each run recorded.

    python scripts/distributed_check.py [--out outputs/distributed_check] [--num_tasks 5] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"):
    os.environ.setdefault(_k, "1" if _k != "TOKENIZERS_PARALLELISM" else "false")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "ci_tiny.yaml"


def worker(out: Path, batch: int, num_tasks: int) -> dict:
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    flags = ["--output_dir", str(out), "--per_device_train_batch_size", str(batch), "--num_tasks", str(num_tasks),
             "--model_name_or_path", str(ROOT / "data" / "tiny-bert"), "--disable_tqdm", "true",
             "--use_cpu", "true"]  # fmt: skip
    groups = parse_config(CONFIG, flags)
    os.chdir(ROOT)  # the config's data paths are relative to the repository
    return run_continual(*groups)


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    latest = json.loads((run / "latest.json").read_text())["checkpoint"]
    return {k: v for k, v in load_file(str(run / latest / "state.safetensors")).items() if k.startswith("weights/")}


def compare(out: Path, num_tasks: int, batch: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", port, __file__, "--worker",
           "--out", str(out / "two"), "--batch", str(batch), "--num_tasks", str(num_tasks)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    one = worker(out / "one", 2 * batch, num_tasks)
    two = json.loads((out / "two" / "results.json").read_text())
    a, b = weights(out / "two"), weights(out / "one")
    rel = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)
    return {"alphas_2_processes": two["alphas"], "alphas_1_process": one["alphas"],
            "max_abs_alpha_difference": max(abs(x - y) for x, y in zip(two["alphas"], one["alphas"])),
            "max_relative_weight_difference": rel, "setup_2": two["distributed"], "setup_1": one["distributed"],
            "global_batch": 2 * batch, "tasks": num_tasks}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "distributed_check")
    parser.add_argument("--num_tasks", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="per-device batch of the 2-process run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.out, args.batch, args.num_tasks)
        return
    shutil.rmtree(args.out, ignore_errors=True)
    print(json.dumps(compare(args.out, args.num_tasks, args.batch), indent=1))


if __name__ == "__main__":
    main()
