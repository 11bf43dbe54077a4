"""Several processes need no repository script: `accelerate launch -m pm_hf train ...` and `torchrun -m pm_hf
train ...` run the CLI module on every process, and give the same run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = ["-m", "pm_hf", "train", "--config", "configs/ci_tiny.yaml", "--use_cpu", "true"]


def _launch(launcher: list[str], out: Path) -> dict:
    done = subprocess.run([*launcher, *TRAIN, "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Results written to") == 1  # the main process reports, once
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow  # two 2-process launches
def test_accelerate_launch_and_torchrun_run_the_cli_module_on_two_processes(tmp_path):
    with socket.socket() as sock:  # a free port for torchrun's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    accelerate = [str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/ddp_cpu.yaml"]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    runs = [_launch(launcher, tmp_path / name) for name, launcher in (("acc", accelerate), ("tr", torchrun))]
    for results in runs:
        assert results["distributed"] == {"type": "MULTI_CPU", "num_processes": 2, "sharding": "none"}
    assert runs[0]["alphas"] == runs[1]["alphas"] and runs[0]["accuracy_matrix"] == runs[1]["accuracy_matrix"]
