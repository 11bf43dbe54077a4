"""`pm_hf.distributed.zero3` by hand: a ZeRO-3 partition (rank r holds elements [r*ps, (r+1)*ps) of the flattened
weight, zero
padded) seen as rows, written, and refused where it is not whole rows; on 2 gloo processes with stand-in parameters
that carry DeepSpeed's partition attributes. The whole ZeRO-3 run: tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from torch import nn

from pm_hf.distributed import loading, zero3
from pm_hf.distributed.sharding import local_rows, shard_like, whole


def _param(whole: torch.Tensor, rank: int, world: int) -> nn.Parameter:
    """A stand-in ZeRO-3 parameter: empty data, this rank's zero-padded flat partition in `ds_tensor`."""
    ps = -(-whole.numel() // world)
    flat = torch.cat([whole.flatten(), whole.new_zeros(ps * world - whole.numel())])
    param = nn.Parameter(torch.empty(0), requires_grad=False)
    param.ds_tensor, param.ds_shape, param.ds_id = flat[rank * ps : (rank + 1) * ps].clone(), whole.shape, 0
    param.ds_status = ZeroParamStatus.NOT_AVAILABLE
    return param


def _worker(rank: int) -> None:
    W = torch.arange(12.0).view(4, 3)
    p = _param(W, rank, 2)
    view = zero3.partition_rows(p)
    assert torch.equal(local_rows(view), W[2 * rank : 2 * rank + 2]) and torch.equal(whole(view), W)
    D = torch.full((4, 3), 0.5)
    view.add_(shard_like(D, view))  # a merge's in-place write lands in the partition
    assert torch.equal(p.ds_tensor, (W + D).flatten()[6 * rank : 6 * rank + 6])
    odd = _param(torch.ones(3, 3), rank, 2)  # 9 elements: 5 per rank, rank 1 padded, rows split
    with pytest.raises(ValueError, match="cannot be read by rows on 2 ranks"):
        zero3.partition_rows(odd)
    V = torch.arange(9.0).view(3, 3) + 1
    zero3.write(odd, V)
    expected = [torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([6.0, 7, 8, 9, 0])]
    assert torch.equal(odd.ds_tensor, expected[rank])  # the padding stays zero
    p.ds_status = ZeroParamStatus.AVAILABLE  # gathered: a write to the partition would not be seen
    with pytest.raises(RuntimeError, match="is gathered"):
        zero3.partition_rows(p)


def test_a_bf16_model_is_loaded_whole_under_zero3(monkeypatch):
    """DeepSpeed's load-time partitioning (transformers' `is_deepspeed_zero3_enabled`) would cast a bf16 model to the
    config's dtype: `loading_whole` turns it off for one load and back on after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3:
        config = {}

        def is_zero3(self):
            return True

    config = Zero3()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", lambda: config)
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    with loading.loading_whole():
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    assert hf_deepspeed.is_deepspeed_zero3_enabled()
    assert not zero3.is_partitioned(nn.Parameter(torch.ones(2))) and zero3.is_partitioned(_param(torch.ones(2), 0, 1))


def test_a_zero3_load_partitions_in_the_models_dtype(monkeypatch):
    """DeepSpeed's load-time partitioning takes its dtype from the DeepSpeed config (fp32 without its mixed
    precision): `loading_in(bf16)` shows it bf16 for that load only; fp32, or no ZeRO-3, leaves the config alone."""
    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3:
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    config = Zero3()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", lambda: config)
    with loading.loading_in(torch.bfloat16):
        assert config.config["bf16"] == {"enabled": True}
    assert "bf16" not in config.config
    with loading.loading_in(torch.float32):
        assert "bf16" not in config.config
    config.config["bf16"] = {"enabled": "auto"}
    with loading.loading_in(torch.bfloat16):
        assert config.config["bf16"] == {"enabled": True}
    assert config.config["bf16"] == {"enabled": "auto"}
