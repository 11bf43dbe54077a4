"""Weights partitioned by DeepSpeed ZeRO-3, read and written by the rest of pm_hf as FSDP2's rows are (through
`pm_hf.distributed.placement.ZeRO3Rows`). The DeepSpeed private state it touches is named in
`pm_hf.distributed.private`.

A ZeRO-3 parameter keeps its partition only: `param.ds_tensor` on rank r holds elements [r*ps, (r+1)*ps) of the
flattened weight (ps = ceil(numel / world), zero-padded at the end), and `param.data` is empty outside the forward
and backward of its module. When a weight's rows divide evenly among the ranks that partition is a block of whole
rows, the rows FSDP2 gives the rank: `partition_rows` shows it as a dim-0 sharded `DTensor` over the same storage,
so the FSDP2 code (`pm_hf.distributed.sharding`: the merge, the Fisher's rows, S, G and the master beside the
weights, the gathers of a checkpoint) runs unchanged on it and divides the continual state by the number of ranks,
and what the merge writes lands in the partition. The small LoRA factors are read whole (`whole`, a gather) and
written partition by partition (`write`, no communication).

Outside a task's training, forward and backward passes (the Fisher, evaluation, generation) need the weights gathered
module by module: `attach_hooks` installs DeepSpeed's ZeRO-3 parameter hooks without an optimizer (so no gradient hook
fires in the Fisher's backward passes), `detach_hooks` takes them off before the next task's engine installs its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

from . import private
from .private import is_partitioned

_MESHES: dict[tuple, object] = {}


def partitioned(model: nn.Module) -> bool:
    return any(is_partitioned(p) for p in model.parameters())


def _mesh(device_type: str):
    """One 1-D mesh over every rank per device type and process group (a new group gets a new mesh)."""
    key = (device_type, id(dist.group.WORLD))
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES.clear()
        _MESHES[key] = init_device_mesh(device_type, (dist.get_world_size(),))
    return _MESHES[key]


def partition_rows(param: nn.Parameter):
    """This rank's partition of a ZeRO-3 weight as a dim-0 sharded `DTensor` of the weight's shape, sharing the
    partition's storage (in-place writes change the weight). Needs the weight's rows to divide among the ranks."""
    from torch.distributed.tensor import DTensor, Shard

    _check_at_rest(param)
    shape, world, part = private.whole_shape(param), dist.get_world_size(), private.partition_of(param)
    per_row = math.prod(shape[1:])
    if not shape or shape[0] % world or part.numel() != shape[0] // world * per_row:
        raise ValueError(
            f"a ZeRO-3 weight of shape {shape} cannot be read by rows on {world} ranks: pm_hf needs the rows of "
            "every adapted weight to divide evenly among the ranks (use FSDP2, or another number of processes)."
        )
    local = part.view(shape[0] // world, *shape[1:])
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    mesh = _mesh(local.device.type)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def _check_at_rest(param: nn.Parameter) -> None:
    """A partition is written only while the parameter is not gathered (a gathered copy would not see the write)."""
    if not private.at_rest(param):
        raise RuntimeError(f"a ZeRO-3 parameter {private.whole_shape(param)} is gathered or stored quantized here")


def whole(param: nn.Parameter) -> torch.Tensor:
    """A whole copy of a ZeRO-3 parameter (a gather: every rank calls it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.data.detach().clone()


def write(param: nn.Parameter, value: torch.Tensor) -> None:
    """Set a ZeRO-3 parameter to `value` (its whole shape, the same on every rank): each rank writes its partition."""
    _check_at_rest(param)
    shape = private.whole_shape(param)
    if tuple(value.shape) != shape:
        raise ValueError(f"a value of shape {tuple(value.shape)} for a ZeRO-3 parameter of {shape}")
    part = private.partition_of(param)
    flat = value.detach().reshape(-1).to(part.device, part.dtype)
    start = dist.get_rank() * part.numel()
    mine = flat[start : start + part.numel()]
    with torch.no_grad():
        part.zero_()
        part[: mine.numel()].copy_(mine)


def attach_hooks(model: nn.Module, engine) -> None:
    """Install ZeRO-3's parameter hooks (gather before a module's forward and backward, release after) on `model`
    with `engine`'s settings and no optimizer: the weights stay partitioned between tasks and forward passes run.
    The destroyed engine's optimizer, which every ZeRO-3 parameter still references, is let go."""
    detach_hooks(model)
    for param in model.parameters():
        private.drop_optimizer_reference(param)
    model._pm_hf_zero3 = coordinator = private.parameter_hooks(model, engine)
    coordinator.get_param_coordinator().release_and_reset_all(model)  # nothing left gathered by the training


@contextmanager
def whole_module(module: nn.Module) -> Iterator[None]:
    """A module's ZeRO-3 parameters gathered whole for reading (a collective); nothing to do for others."""
    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def gathered_unless_hooked(model: nn.Module):
    """A forward pass on a partitioned model before any engine or `attach_hooks` installed ZeRO-3's hooks (a resumed
    run's first drift measurement, before its first task's Trainer): the weights are gathered whole for the pass."""
    return nullcontext() if getattr(model, "_pm_hf_zero3", None) is not None else whole_module(model)


def detach_hooks(model: nn.Module) -> None:
    """Take `attach_hooks`'s hooks off (before a task's engine installs its own) and the backward functions DeepSpeed
    left on the modules: it creates them once per module, bound to the first engine, and keeps them otherwise."""
    coordinator = getattr(model, "_pm_hf_zero3", None)
    if coordinator is not None:
        coordinator.destroy()
        del model._pm_hf_zero3
    for module in model.modules():
        private.drop_backward_functions(module)
