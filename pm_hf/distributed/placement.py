"""Where the weights of a run live, as one value chosen when the run is assembled: `Replicated` (one process, or DDP:
every rank holds every weight whole), `ShardedRows` (FSDP2: a weight's dim-0 rows split among the ranks as
`DTensor`s, `Shard(0)`) or `ZeRO3Rows` (DeepSpeed ZeRO-3: each rank's partition read as those same rows,
`pm_hf.distributed.zero3`). The method code (Fisher, adapters, weights, heads) asks the placement to read and write
whole tensors or this rank's rows, to gather, zero-fill, reduce scalars and check finiteness across ranks, and to
accumulate the Fisher's sums over the ranks' samples; it never asks which launch mode runs.

The run's placement is attached to its model (`place`) and read back with `placement_of`, which for a model nobody
placed (a library user's, a test's) tells it from the model's parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from ..errors import invalid
from . import private, sharding, zero3
from .fisher_sums import ReplicatedSums, ShardedSums
from .loading import distribute_loaded

_ATTRIBUTE = "pm_hf_placement"


class Replicated:
    """Every weight whole on every rank (one process, DDP, DeepSpeed ZeRO 0-2): reads and writes are plain."""

    name = "none"  # results.json `distributed.sharding`

    def forward_is_collective(self, model: nn.Module) -> bool:
        """Whether a forward pass of `model` needs every rank (generation then keeps the ranks in step)."""
        return False

    def as_rows(self, param: torch.Tensor) -> torch.Tensor:
        """A parameter as pm_hf reads and writes it: here the parameter itself."""
        return param

    def whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor (a gather where rows are split: every rank calls it)."""
        return tensor

    def local_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor (all of them here)."""
        return tensor

    def row_range(self, tensor: torch.Tensor) -> tuple[int, int]:
        return sharding.row_range(tensor)

    def shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """A parameter's whole shape."""
        return tuple(param.shape)

    def scalar(self, value) -> float:
        return sharding.scalar(value)

    def all_finite(self, tensor: torch.Tensor) -> bool:
        return sharding.all_finite(tensor)

    def gather(self, tensors: Mapping[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
        return sharding.gather(tensors, keep)

    def splits(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether any of `tensors` is split among the ranks (this rank holding some rows only)."""
        return False

    def shard_like(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return value

    def shard_state(self, state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict:
        return dict(state)

    def zeros(self, like: torch.Tensor, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Zeros shaped like `like` (on `device`, default `like`'s), split as it is."""
        return torch.zeros(like.shape, dtype=dtype, device=device or like.device)

    def keep_rows(self, tensor: torch.Tensor, rows) -> torch.Tensor:
        return sharding.keep_rows(tensor, rows)

    def copy_rows(self, target: torch.Tensor, source: torch.Tensor, rows) -> None:
        sharding.copy_rows(target, source, rows)

    def write(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set a parameter to a whole `value` (the same on every rank)."""
        with torch.no_grad():
            param.copy_(value.to(param.dtype))

    def factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole, detached LoRA factors."""
        return A.detach(), B.detach()

    def lora_delta(self, A, B, scale: float, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
        """scale * B @ A in fp32, in the layout of `weight` (transposed for Conv1D), split as `weight` is."""
        delta = (B.detach().float() @ A.detach().float()).mul_(scale)  # the bits of `* scale`, one tensor fewer
        return delta.T if transposed else delta

    def whole_module(self, module: nn.Module):
        """A module's weights whole for reading inside the block (a collective where they are partitioned)."""
        return nullcontext()

    def forward_ready(self, model: nn.Module):
        """A forward pass outside training runs inside this block."""
        return nullcontext()

    def grown(self, old: nn.Module, build, num_classes: int) -> nn.Module:
        """`build()` (a head of `num_classes` rows replacing `old`, reading its weights), placed as `old` is."""
        return build()

    def fisher_sums(self, sums: dict[str, torch.Tensor]):
        """How the Fisher's fp32 sums (made with `zeros`) are accumulated over every rank's samples."""
        return ReplicatedSums(sums)


class ShardedRows(Replicated):
    """FSDP2: a parameter (and the state beside it) is a `DTensor` split along dim 0; a tensor not (yet) sharded, as
    before the first Trainer prepares the model, is read and written whole."""

    name = "fsdp2"

    def forward_is_collective(self, model):
        return any(sharding.is_sharded(p) for p in model.parameters())  # once the first Trainer has sharded it

    def whole(self, tensor):
        return sharding.whole(tensor)

    def local_rows(self, tensor):
        return sharding.local_rows(tensor)

    def splits(self, tensors):
        return any(sharding.is_sharded(v) for v in tensors.values())

    def shard_like(self, value, like):
        return sharding.shard_like(value, like)

    def shard_state(self, state, like):
        return sharding.shard_state(state, like)

    def zeros(self, like, device=None, dtype=torch.float32):
        return sharding.zeros_like(like, dtype, device)

    def write(self, param, value):
        with torch.no_grad():
            param.copy_(sharding.shard_like(value.to(param.dtype), param))

    def factors(self, A, B):
        return sharding.whole(A.detach()), sharding.whole(B.detach())

    def lora_delta(self, A, B, scale, weight, transposed):
        if not sharding.is_sharded(B):
            return super().lora_delta(A, B, scale, weight, transposed)
        rows = (sharding.local_rows(B.detach()).float() @ sharding.whole(A.detach()).float()) * scale
        return sharding.from_rows(rows, B, A.shape[1])  # this rank's rows of B times the whole A

    def grown(self, old, build, num_classes):
        if sharding.is_sharded(old.weight):
            fix = "a head sharded by FSDP2 cannot grow in place: give tasks with new classes before training starts."
            raise invalid("num_labels", num_classes, fix)
        return build()

    def fisher_sums(self, sums):
        if any(sharding.is_sharded(v) for v in sums.values()):
            return ShardedSums(sums)
        return ReplicatedSums(sums)


class ZeRO3Rows(ShardedRows):
    """DeepSpeed ZeRO-3: a parameter's partition read as its rows (`zero3.partition_rows`, a dim-0 sharded
    `DTensor` over the partition's storage), so the state beside it is split as under FSDP2; LoRA factors are read
    gathered and written partition by partition."""

    name = "zero3"

    def forward_is_collective(self, model):
        return any(zero3.is_partitioned(p) for p in model.parameters()) or super().forward_is_collective(model)

    def as_rows(self, param):
        return zero3.partition_rows(param) if zero3.is_partitioned(param) else param

    def shape(self, param):
        return private.whole_shape(param) if zero3.is_partitioned(param) else tuple(param.shape)

    def write(self, param, value):
        if zero3.is_partitioned(param):
            zero3.write(param, value)
        else:
            super().write(param, value)

    def factors(self, A, B):
        if zero3.is_partitioned(A):
            return zero3.whole(A), zero3.whole(B)
        return super().factors(A, B)

    def lora_delta(self, A, B, scale, weight, transposed):
        if not zero3.is_partitioned(A):
            return super().lora_delta(A, B, scale, weight, transposed)
        A, B = zero3.whole(A), zero3.whole(B)
        if not zero3.is_partitioned(weight) or transposed:
            return Replicated.lora_delta(self, A, B, scale, weight, transposed)
        view = zero3.partition_rows(weight)  # the rows the rank's partition holds
        start, stop = sharding.row_range(view)
        return sharding.from_rows((B[start:stop].float() @ A.float()) * scale, view, A.shape[1])

    def whole_module(self, module):
        return zero3.whole_module(module)

    def forward_ready(self, model):
        return zero3.gathered_unless_hooked(model)

    def grown(self, old, build, num_classes):
        with zero3.whole_module(old):  # before any engine: the old weights gathered for the copy
            new = build()
        if zero3.is_partitioned(old.weight):
            distribute_loaded(new)  # partitioned like the rest of the model
        return new


def detect(model: nn.Module) -> Replicated:
    """The placement a model's parameters show: FSDP2's `DTensor`s, ZeRO-3 partitions, or neither."""
    params = list(model.parameters())
    if any(sharding.is_sharded(p) for p in params):
        return ShardedRows()
    return ZeRO3Rows() if any(zero3.is_partitioned(p) for p in params) else Replicated()


def for_run(model: nn.Module, fsdp: bool) -> Replicated:
    """The placement of a run once its model is loaded: what the model shows, or FSDP2's rows when the run asks for
    FSDP (the first Trainer shards the model; until then its tensors are read whole)."""
    found = detect(model)
    return ShardedRows() if fsdp and type(found) is Replicated else found


def place(model: nn.Module, placement: Replicated) -> Replicated:
    """Attach the run's placement to its model (read back by `placement_of`, also through PEFT's wrappers)."""
    model.__dict__[_ATTRIBUTE] = placement
    return placement


def placement_of(model: nn.Module) -> Replicated:
    """The placement attached to `model` (or to the model a PEFT / DDP wrapper holds), else the one its parameters
    show."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    found = getattr(inner, _ATTRIBUTE, None)  # PEFT's wrappers forward unknown attributes to the model they hold
    return found if isinstance(found, Replicated) else detect(model)


def process_rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
