"""Weights partitioned by DeepSpeed ZeRO-3, presented to the rest of pm_hf as FSDP2's are. Every DeepSpeed internal
pm_hf touches is in this module.

A ZeRO-3 parameter keeps its partition only: `param.ds_tensor` on rank r holds elements [r*ps, (r+1)*ps) of the
flattened weight (ps = ceil(numel / world), zero-padded at the end), and `param.data` is empty outside the forward
and backward of its module. When a weight's rows divide evenly among the ranks that partition is a block of whole
rows, the rows FSDP2 gives the rank: `rows` presents it as a dim-0 sharded `DTensor` over the same storage, so the
FSDP2 code (`pm_hf.sharding`: the merge, the Fisher's rows, S, G and the master beside the weights, the gathers of a
checkpoint) runs unchanged on it and divides the continual state by the number of ranks, and what the merge writes
lands in the partition. The small LoRA factors are read whole (`whole`, a gather) and written partition by
partition (`write`, no communication).

Outside a task's training, forward and backward passes (the Fisher, evaluation, generation) need the weights gathered
module by module: `serve` installs DeepSpeed's ZeRO-3 parameter hooks without an optimizer (so no gradient hook
fires in the Fisher's backward passes), `unserve` takes them off before the next task's engine installs its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

_MESHES: dict[str, object] = {}


def is_partitioned(param) -> bool:
    """Whether `param` is a ZeRO-3 parameter (its value lives in `ds_tensor`, one partition per rank)."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_id")


def partitioned(model: nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


def _mesh(device_type: str):
    if device_type not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[device_type] = init_device_mesh(device_type, (dist.get_world_size(),))
    return _MESHES[device_type]


def rows(param: nn.Parameter):
    """This rank's partition of a ZeRO-3 weight as a dim-0 sharded `DTensor` of the weight's shape, sharing the
    partition's storage (in-place writes change the weight). Needs the weight's rows to divide among the ranks."""
    from torch.distributed.tensor import DTensor, Shard

    shape, world = tuple(param.ds_shape), dist.get_world_size()
    per_row = math.prod(shape[1:])
    if not shape or shape[0] % world or param.ds_tensor.numel() != shape[0] // world * per_row:
        raise ValueError(
            f"a ZeRO-3 weight of shape {shape} cannot be presented by rows on {world} ranks: pm_hf needs the rows of "
            "every adapted weight to divide evenly among the ranks (use FSDP2, or another number of processes)."
        )
    local = param.ds_tensor.data.view(shape[0] // world, *shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    mesh = _mesh(local.device.type)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def whole(param: nn.Parameter) -> torch.Tensor:
    """A whole copy of a ZeRO-3 parameter (a gather: every rank calls it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.data.detach().clone()


def write(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a ZeRO-3 parameter to `value` (its whole shape, the same on every rank): each rank writes its partition."""
    if tuple(value.shape) != tuple(param.ds_shape):
        raise ValueError(f"a value of shape {tuple(value.shape)} for a ZeRO-3 parameter of {tuple(param.ds_shape)}")
    part = param.ds_tensor.data
    flat = value.detach().reshape(-1).to(part.device, part.dtype)
    start = dist.get_rank() * part.numel()
    mine = flat[start : start + part.numel()]
    with torch.no_grad():
        part.zero_()
        part[: mine.numel()].copy_(mine)


def serve(model: nn.Module, engine) -> None:
    """Install ZeRO-3's parameter hooks (gather before a module's forward and backward, release after) on `model`
    with `engine`'s settings and no optimizer: the weights stay partitioned between tasks and forward passes run.
    The destroyed engine's optimizer, which every ZeRO-3 parameter still references, is let go."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    unserve(model)
    for param in model.parameters():
        param.__dict__.pop("_z3_optimizer", None)
    model._pm_hf_zero3 = DeepSpeedZeRoOffload(
        model,
        timers=NoopTimer(),
        ds_config=engine.config,
        overlap_comm=engine.zero_overlap_comm(),
        prefetch_bucket_size=engine.zero_prefetch_bucket_size(),
        max_reuse_distance=engine.zero_max_reuse_distance(),
        max_live_parameters=engine.zero_max_live_parameters(),
        param_persistence_threshold=engine.zero_param_persistence_threshold(),
        model_persistence_threshold=engine.zero_model_persistence_threshold(),
        offload_param_config=engine.zero_offload_param(),
    )


def unserve(model: nn.Module) -> None:
    """Take `serve`'s hooks off (before a task's engine installs its own)."""
    coordinator = getattr(model, "_pm_hf_zero3", None)
    if coordinator is not None:
        coordinator.destroy()
        del model._pm_hf_zero3


@contextmanager
def loading_whole() -> Iterator[None]:
    """Load a model whole, on this process alone, while ZeRO-3 is on (transformers would partition it as it loads, a
    collective every rank must join): the export's pristine base, loaded by the main process only."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
