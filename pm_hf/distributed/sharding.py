"""Weights sharded by FSDP2 (`fully_shard`): every sharded parameter is a `DTensor` split along dim 0, and the
continual state that shadows a weight (task vector, Fisher, S, G, fp32 master) is a `DTensor` with the same
placements, so each rank holds its rows only and per-rank memory divides by the number of ranks.

Elementwise math works on such tensors as on plain ones. A reduction does not: the sum of a sharded tensor is a
*partial* sum on each rank, and `float()` of it gives the rank's own part, silently. Every scalar taken from state
tensors goes through `scalar`, which completes the sum across ranks. Files hold whole tensors (`gather`), so a
checkpoint or an export does not depend on the number of processes; `shard_like` splits a whole tensor back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

try:  # torch >= 2.4
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - older torch: nothing is ever sharded
    DTensor = Shard = distribute_tensor = FSDPModule = None


def is_sharded(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered (a collective for a sharded one: every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (its rows), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def zeros_like(tensor: torch.Tensor, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Zeros shaped like `tensor`: split as it is when sharded, else whole on `device` (default: the tensor's)."""
    if is_sharded(tensor):
        return torch.zeros_like(tensor, dtype=dtype)
    return torch.zeros(tensor.shape, dtype=dtype, device=device or tensor.device)


def scalar(value: torch.Tensor | float) -> float:
    """A Python float from a 0-d tensor, with a partial sum over shards completed across ranks."""
    return float(whole(value)) if isinstance(value, torch.Tensor) else float(value)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, on every rank's shard (the same answer on every rank)."""
    if not is_sharded(tensor):
        return bool(torch.isfinite(tensor).all())
    ok = torch.isfinite(tensor.to_local()).all().to(torch.int32).reshape(1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def gather(tensors: Mapping[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Whole copies of every tensor of a dict, in key order (collective when any is sharded: every rank calls it).
    A sharded tensor is gathered to host memory one at a time; with `keep=False` (a rank that writes nothing) only
    the unsharded ones are returned, so no rank ever holds the whole state on the accelerator."""
    out = {}
    for k, v in tensors.items():
        if not is_sharded(v):
            out[k] = v
            continue
        whole = v.full_tensor().cpu()
        if keep:
            out[k] = whole
    return out


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every rank) split as `like` is; unchanged when `like` is not sharded.
    No communication: each rank keeps its rows."""
    if not is_sharded(like) or is_sharded(value):
        return value
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(value.shape)} cannot be sharded like one of {tuple(like.shape)}")
    value = value.to(like.to_local().device)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


def shard_state(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shard a loaded state dict whose keys end with a merge key (`S/<key>`, `G/<key>`, `<key>`) like the model's
    tensor of that merge key; other entries stay whole."""
    sharded = {k: v for k, v in like.items() if is_sharded(v)}
    if not sharded:
        return dict(state)
    out = {}
    for name, value in state.items():
        key = next((k for k in sharded if name == k or name.endswith("/" + k)), None)
        same = key is not None and tuple(value.shape) == tuple(sharded[key].shape)
        out[name] = shard_like(value, sharded[key]) if same else value
    return out


def row_range(tensor: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 this rank holds (FSDP2 splits dim 0 as `torch.chunk` does)."""
    if not is_sharded(tensor):
        return 0, tensor.shape[0]
    if tuple(tensor.placements) != (Shard(0),):
        raise ValueError(f"only dim-0 sharding (FSDP2's) is supported, not {tensor.placements}")
    n, world = tensor.shape[0], tensor.device_mesh.size()
    chunk = -(-n // world)
    rank = tensor.device_mesh.get_local_rank()
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    if stop - start != tensor.to_local().shape[0]:
        raise ValueError(f"unexpected shard of {n} rows on rank {rank}: {tensor.to_local().shape[0]} rows")
    return start, stop


def keep_rows(tensor: torch.Tensor, rows) -> torch.Tensor:
    """`tensor` with every dim-0 row not in `rows` zeroed; a sharded tensor on each rank's own rows (no
    communication), sharded as it was."""
    start, stop = row_range(tensor)
    part = local_rows(tensor)
    keep = torch.zeros(stop - start, dtype=torch.bool, device=part.device)
    keep[[r - start for r in rows if start <= r < stop]] = True
    kept = part * keep.view(-1, *([1] * (part.dim() - 1)))
    if not is_sharded(tensor):
        return kept
    return DTensor.from_local(kept, tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride())


def copy_rows(target: torch.Tensor, source: torch.Tensor, rows) -> None:
    """target[rows] = source[rows] in place, exactly; sharded alike, each rank copies the rows it holds."""
    start, stop = row_range(target)
    if row_range(source) != (start, stop):
        raise ValueError("copy_rows: the source is not sharded like the target")
    mine = [r - start for r in rows if start <= r < stop]
    if mine:
        local_rows(target)[mine] = local_rows(source)[mine].to(target.dtype)


def from_rows(rows: torch.Tensor, like: torch.Tensor, columns: int) -> torch.Tensor:
    """A [n, columns] tensor sharded by rows as `like` ([n, ...], dim-0 sharded) is, from this rank's `rows`."""
    shape = (like.shape[0], columns)
    return DTensor.from_local(rows, like.device_mesh, like.placements, shape=shape, stride=(columns, 1))


def root_reshards(model: torch.nn.Module, between_tasks: bool) -> None:
    """FSDP2 keeps its root module's weights whole after a forward pass (training's backward needs them at once), so
    after a forward-only pass (evaluation, the Fisher, head alignment) the trained weights the root holds itself (a
    classifier's head, `modules_to_save` outside the wrapped layers) would be plain tensors while pm_hf reads and
    writes shards. Between tasks such a root reshards after every forward, and at once; for training
    (`between_tasks=False`) FSDP2's default is back. A root holding no trained weight (a causal LM adapted inside its
    decoder layers) keeps FSDP2's default throughout: generation then does not gather its embeddings at every step."""
    units = [(n, m) for n, m in model.named_modules() if FSDPModule is not None and isinstance(m, FSDPModule)]
    if not units or not _root_trains(*units):
        return
    root = units[0][1]
    root.set_reshard_after_forward(between_tasks, recurse=False)
    if between_tasks:
        root.reshard()


def _root_trains(root: tuple[str, torch.nn.Module], *inner: tuple[str, torch.nn.Module]) -> bool:
    """Whether the FSDP2 root holds a trainable parameter itself (not through a wrapped inner module)."""
    name, module = root
    prefixes = tuple(n[len(name) + 1 :] + "." if name else n + "." for n, _ in inner)
    return any(p.requires_grad and not n.startswith(prefixes) for n, p in module.named_parameters())


def all_gather_padded(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (shape [B, T, D], B and T may differ per rank) stacked along dim 0, zero-padded to the
    largest B and T: rows of zeros add nothing to a sum of squared outer products."""
    world = dist.get_world_size()
    sizes = torch.tensor([x.shape[0], x.shape[1]], device=x.device)  # on the backend's device (gloo: CPU)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    b, t = (int(s) for s in sizes.tolist())
    padded = x.new_zeros(b, t, x.shape[2])
    padded[: x.shape[0], : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts, 0)


def per_process(value: float, device: torch.device | str = "cpu") -> list[float]:
    """Every process's `value`, in rank order ([value] without a process group): each rank fills its own slot of a
    zero vector and a sum completes it, exactly (x + 0 = x, a NaN stays in its slot). `device`: the backend's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    slots = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    slots[dist.get_rank()] = value
    dist.all_reduce(slots)
    return slots.cpu().tolist()


def every_process(obj) -> list:
    """Every process's picklable `obj`, in rank order ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def dot64(x: torch.Tensor, y: torch.Tensor) -> float:
    """sum(x * y) in float64 over the whole tensors, y float64 (a dot product; for split tensors the elementwise
    product of this rank's rows, summed across ranks)."""
    if is_sharded(x) or is_sharded(y):
        return scalar((x.to(y.device, torch.float64) * y).sum())
    return float(torch.dot(x.detach().reshape(-1).to(y.device, torch.float64), y.reshape(-1)))


class Scratch:
    """`count` flat buffers of `dtype` reused across a pass over many tensors (the closed form's float64 sums, the
    accumulator update's products): each tensor is converted or multiplied into memory already held, not into a
    fresh allocation per tensor, whose first touch costs more than the arithmetic on a CPU. `take` returns views that
    start at each buffer's start (a fresh tensor's alignment: a BLAS reduction over them gives the same bits)."""

    def __init__(self, count: int, dtype: torch.dtype):
        self.count, self.dtype = count, dtype
        self.buffers: dict[torch.device, list[torch.Tensor]] = {}

    def take(self, like: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor] | None:
        """`count` views shaped like `like`, on its device (their contents undefined), or None when any of `like`
        and `others` is split across ranks (the caller then works on whole expressions). A larger request grows the
        buffers: presize them with the pass's largest tensor (`reserve`)."""
        if any(is_sharded(t) for t in (like, *others)):
            return None
        held = self.buffers.get(like.device)
        if held is None or held[0].numel() < like.numel():
            held = [torch.empty(like.numel(), dtype=self.dtype, device=like.device) for _ in range(self.count)]
            self.buffers[like.device] = held
        return [b[: like.numel()].view(like.shape) for b in held]

    def reserve(self, tensors) -> Scratch:
        """Size the buffers for the largest tensor of `tensors` on each device (split ones left out); returns self."""
        largest: dict[torch.device, torch.Tensor] = {}
        for t in tensors:
            if not is_sharded(t) and (t.device not in largest or t.numel() > largest[t.device].numel()):
                largest[t.device] = t
        for t in largest.values():
            self.take(t)
        return self


def as_float64(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float64, detached (flattened unless split: a split one keeps its layout for `dot64`)."""
    return tensor.detach().double() if is_sharded(tensor) else tensor.detach().reshape(-1).double()
