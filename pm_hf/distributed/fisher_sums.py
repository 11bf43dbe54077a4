"""The Fisher's sums over every rank's samples, by placement: `ReplicatedSums` (whole sums, each rank its own
samples, all-reduced at the end) and `ShardedSums` (sums split by rows like the weights: the ranks all-gather the
probes' inputs and output gradients, each accumulates its own rows over every rank's samples, and every rank runs
the same number of batches, padded with weight-0 filler samples, since a sharded forward pass is a collective).
A sharded accumulation is the placement's, not the estimator's (`pm_hf.method.fisher`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import sharding
from .sharding import all_gather_padded, row_range


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ReplicatedSums:
    """Whole fp32 sums (one process, DDP): every rank accumulates its own samples."""

    def __init__(self, sums: dict[str, torch.Tensor]):
        self.sums = sums

    def check(self, per_sample: bool, transposed: bool) -> None:
        """Refuse what this accumulation cannot do (nothing here)."""

    def batches(self, mine: list[int], size: int, device: torch.device):
        """(sample indices, 1/0 per sample: real or filler) per batch of this rank's samples."""
        yield from _batches(mine, size, 1, device)

    def weigh(self, losses: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The per-sample losses whose gradients are accumulated (filler samples weighted 0 where there are any)."""
        return losses

    def count(self, losses: torch.Tensor, real: torch.Tensor) -> int:
        """The real samples of a batch."""
        return losses.shape[0]

    def probe(self, x: torch.Tensor, g: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """A probe's inputs [B, T, in] and output gradients [B, T, out] as this rank accumulates them."""
        return x, g

    def add(self, key: str, value: torch.Tensor) -> None:
        target = sharding.local_rows(self.sums[key])
        target.add_(value.to(target.device))

    def mean(self, count: int) -> dict[str, torch.Tensor]:
        """The sums over every rank's samples divided by their number (collective with several processes), in place: the
        Fisher is the sums' own tensors (one copy of it at a time, the pass's peak)."""
        if _world() > 1:
            n = torch.tensor([float(count)], dtype=torch.float64, device=next(iter(self.sums.values())).device)
            dist.all_reduce(n)
            count = int(n.item())
            for t in self.sums.values():
                if not sharding.is_sharded(t):  # a sharded sum already holds every rank's samples (`probe`)
                    dist.all_reduce(t)
        if count == 0:
            raise ValueError("the Fisher dataset is empty; pass the task's training data.")
        return {k: v.div_(count) for k, v in self.sums.items()}  # in place: the sums are not read again


class ShardedSums(ReplicatedSums):
    """Sums split by rows like the weights (FSDP2, ZeRO-3): every rank's samples, this rank's rows."""

    def check(self, per_sample, transposed):
        if not per_sample or transposed:
            raise ValueError(
                "a sharded model's Fisher is per sample, over untransposed weights: fisher_mode 'per_sample'"
            )

    def batches(self, mine, size, device):
        yield from _batches(mine, size, _world(), device)

    def weigh(self, losses, real):
        return losses * real.to(losses.device)

    def count(self, losses, real):
        return int(real.sum())

    def probe(self, x, g, keys):
        split = next((self.sums[k] for k in keys if sharding.is_sharded(self.sums[k])), None)
        if split is None:
            return x, g
        start, stop = row_range(split)
        return all_gather_padded(x), all_gather_padded(g)[..., start:stop]


def _batches(mine: list[int], size: int, world: int, device: torch.device):
    """(sample indices, 1/0 per sample: real or filler) per batch. A sharded model's forward is a collective, so
    with `world` > 1 every rank runs the same number of batches: a rank out of samples repeats one with weight 0."""
    if world > 1:
        n = torch.tensor([len(mine)], device=device)  # on the backend's device (NCCL: the GPU)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        total = -(-int(n) // size) * size
    else:
        total = len(mine)
    for start in range(0, total, size):
        part = mine[start : start + size]
        real = torch.ones(len(part))
        if world > 1 and len(part) < size:  # pad to the batch size with a filler sample (weight 0)
            filler = (mine or [0])[0]
            part, real = part + [filler] * (size - len(part)), torch.cat([real, torch.zeros(size - len(part))])
        yield part, real
