"""The slow tier's spawned gloo group (each spawn costs seconds of interpreter start on 2 cores): on 2 CPU
processes, FSDP2's row operations against the whole tensor and its root's resharding (tests/test_sharding.py),
ZeRO-3 partitions seen and written as rows (tests/test_zero3.py), and the Fisher all-reduced over the ranks' samples
against one process's (tests/test_fisher.py); each worker's own assertions, in turn, then the Fisher compared here."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import on_two_processes
from test_fisher import distributed_fisher, single_process_fisher
from test_sharding import _root_worker
from test_sharding import _worker as sharding_worker
from test_zero3 import _worker as zero3_worker


def _every_worker(path: str, rank: int) -> None:
    sharding_worker(rank)
    _root_worker(rank)
    zero3_worker(rank)
    distributed_fisher(path, rank)


@pytest.mark.slow  # a second multi-process launch; the default tier keeps tests/test_distributed.py's
def test_row_operations_zero3_partitions_and_the_fisher_on_two_gloo_processes(tmp_path):
    path = str(tmp_path / "fisher.pt")
    on_two_processes(functools.partial(_every_worker, path))
    dist_f, single = torch.load(path), single_process_fisher()
    assert set(dist_f) == set(single)
    err = max(float((dist_f[k] - single[k]).norm() / single[k].norm()) for k in single)
    assert err <= 1e-6, err
