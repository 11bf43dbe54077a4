"""`pm_hf.distributed.sharding`'s row operations by hand on 2 gloo processes: a 5-row tensor sharded by FSDP2's dim-0
split (3
rows on rank 0, 2 on rank 1), each operation against the same operation on the whole tensor; a sharded head refuses
to grow; FSDP2's root module reshards between tasks. The whole FSDP2 runs: tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

from pm_hf.config.checks import InputError
from pm_hf.distributed.sharding import copy_rows, is_sharded, keep_rows, local_rows, root_reshards, row_range, whole
from pm_hf.heads.head import Head


def _worker(rank: int) -> None:
    mesh = init_device_mesh("cpu", (2,))
    W = torch.arange(15.0).view(5, 3) + 1
    sharded = distribute_tensor(W, mesh, [Shard(0)])
    assert row_range(sharded) == [(0, 3), (3, 5)][rank]
    kept = keep_rows(sharded, [1, 3])  # the merged part of a head: rows of classes trained before and now
    assert is_sharded(kept) and local_rows(kept).shape[0] == [3, 2][rank]
    expected = torch.zeros(5, 3)
    expected[[1, 3]] = W[[1, 3]]
    assert torch.equal(whole(kept), expected) and torch.equal(keep_rows(W, [1, 3]), expected)
    before = distribute_tensor(-W, mesh, [Shard(0)])
    copy_rows(sharded, before, [0, 4])  # rows of classes not in the task restored exactly
    expected = W.clone()
    expected[[0, 4]] = -W[[0, 4]]
    assert torch.equal(whole(sharded), expected)
    bias = distribute_tensor(torch.arange(5.0), mesh, [Shard(0)])
    assert torch.equal(whole(keep_rows(bias, [4])), torch.tensor([0.0, 0, 0, 0, 4]))
    model = nn.Sequential(nn.Linear(3, 4))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
    with pytest.raises(InputError, match=r"^num_labels = 6: a head sharded by FSDP2 cannot grow"):
        Head(model, 4).grow(model, 6)  # new classes after the model was sharded: refused, nothing changed
    assert model[0].out_features == 4


def _root_worker(rank: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6))  # [0]: a wrapped layer, [1]: a head the root holds
    model[0].requires_grad_(False)
    fully_shard(model[0])
    fully_shard(model)
    with torch.no_grad():
        model(torch.ones(2, 4))
    assert not is_sharded(model[1].weight)  # FSDP2's root keeps its weights whole after a forward
    root_reshards(model, between_tasks=True)
    assert is_sharded(model[1].weight)
    with torch.no_grad():
        model(torch.ones(2, 4))
    assert is_sharded(model[1].weight) and is_sharded(model[0].weight)  # between tasks: sharded after every forward
    root_reshards(model, between_tasks=False)
    with torch.no_grad():
        model(torch.ones(2, 4))
    assert not is_sharded(model[1].weight)  # training: FSDP2's default again
    model[1].requires_grad_(False)  # a root that trains nothing itself (a causal LM adapted in its layers)
    root_reshards(model, between_tasks=True)
    assert not is_sharded(model[1].weight)  # left as FSDP2 has it
