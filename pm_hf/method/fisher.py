"""Diagonal Fisher estimation at theta*_t (docs/method.md, 'Fisher estimator').

What is squared and what is averaged, named once:
- `per_sample` (default, the empirical Fisher): F = (1/N) sum_n (d l_n / d theta)^2, l_n = the training loss of
  sample n (its true label; for causal LMs the mean token CE over its supervised tokens).
- `batch`: F = (1/N) sum_k B_k (d Lbar_k / d theta)^2, Lbar_k = mean loss of mini-batch k of size B_k (cheaper;
  biased towards zero when per-sample gradients disagree).
- `fisher_labels='sampled'`: the labels are drawn from the model's predictive distribution (the true Fisher).

Gradients w.r.t. a LoRA layer's effective weight W + s B A equal those w.r.t. its base weight, so they come from
hooks: per-sample grad = delta_n^T X_n (output grads times inputs, summed over that sample's tokens). No parameter
`.grad` is touched. Model in eval mode (no dropout), adapter unscaled, fp32 accumulation. In a distributed run
every rank takes a shard of the samples and the sums and the count are all-reduced, so the result does not depend
on the number of processes. How the sums are held and accumulated over the ranks' samples (whole, or split by rows
like the weights) is the run's placement's (`pm_hf.distributed.placement`, `pm_hf.distributed.fisher_sums`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config.groups import FisherArguments
from ..distributed.placement import Replicated, placement_of, process_rank_world
from ..distributed.sharding import scalar
from .adapters import base_weights, full_trainable_params, lora_layers, strip_prefix, unwrap

PerSampleLoss = Callable[[nn.Module, dict], torch.Tensor]
AT_ONCE_BYTES = 64 * 2**20  # a batch's per-sample weight gradients of one layer are made at once up to this


def per_sample_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    sample_labels: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss of every sample in `batch` (shape [B]): CE for classifiers (labels [B]); for causal LMs (labels [B, T],
    -100 = unsupervised) the mean token CE over that sample's supervised tokens, after the usual one-token shift.
    With `sample_labels`, labels are drawn from the model's own predictive distribution at the supervised places."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    logits = model(**inputs).logits.float()
    if labels.dim() == 1:
        if sample_labels:
            labels = _sample(logits, generator)
        return F.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    if sample_labels:
        labels = torch.where(mask, _sample(logits, generator), labels)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=-100)
    ce = ce.view(labels.shape) * mask
    return ce.sum(1) / mask.sum(1).clamp(min=1)


def _sample(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.detach().float(), -1).reshape(-1, logits.shape[-1]).cpu()
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).to(logits.device)


class _Probe:
    """Captures input and output of a linear-like module during the forward pass."""

    def __init__(self, module: nn.Module, keys: dict[str, str], transpose: bool):
        self.keys, self.transpose = keys, transpose  # role ('weight'/'bias') -> merge key
        self.x = self.y = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.y is not None:
            raise ValueError(
                "a module probed for the Fisher ran twice in one forward pass (shared weights); "
                "use fisher_mode='batch' or leave that module out of the merge."
            )
        self.x, self.y = args[0], output

    def clear(self):
        self.x = self.y = None


def _build_probes(model: nn.Module, keys: Sequence[str]) -> dict[str, _Probe]:
    """One probe per module that owns a merge key; raises for keys no linear-like module owns."""
    lora = lora_layers(model)
    modules = {strip_prefix(n): m for n, m in unwrap(model).named_modules()}
    wanted: dict[str, dict[str, str]] = {}
    transpose: dict[str, bool] = {}
    for key in keys:
        mod_name, role = key.rsplit(".", 1)
        module = lora.get(key) if key in lora else modules.get(mod_name)
        linear_like = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or key in lora
        if module is None or role not in ("weight", "bias") or not linear_like:
            raise ValueError(
                f"Fisher key {key!r} is not the weight or bias of a linear (or Conv1D) module; "
                "leave it out of the merged parameters."
            )
        wanted.setdefault(mod_name, {})[role] = key
        transpose[mod_name] = bool(getattr(module, "fan_in_fan_out", False)) or type(module).__name__ == "Conv1D"
    return {
        name: _Probe(lora.get(f"{name}.weight") or modules[name], roles, transpose[name])
        for name, roles in wanted.items()
    }


def default_fisher_keys(model: nn.Module) -> list[str]:
    """LoRA effective weights plus fully trained linear parameters."""
    return list(lora_layers(model)) + list(full_trainable_params(model))


def _accumulate(probes: dict[str, _Probe], loss_terms: torch.Tensor, per_sample: bool, sums) -> None:
    """Add a batch's squared gradients to `sums` (a placement's `fisher_sums`)."""
    ys = [p.y for p in probes.values()]
    grads = torch.autograd.grad(loss_terms.sum(), ys, allow_unused=True)
    for probe, g in zip(probes.values(), grads):
        if g is None:
            continue
        x = probe.x.detach().float().reshape(g.shape[0], -1, probe.x.shape[-1])
        g = g.detach().float().reshape(g.shape[0], -1, g.shape[-1])
        x, g = sums.probe(x, g, probe.keys.values())
        squared = dict(zip(("weight", "bias"), squared_grads(g, x, per_sample)))
        for role, key in probe.keys.items():
            grad = squared[role]
            sums.add(key, grad.T if role == "weight" and probe.transpose else grad)


def squared_grads(g: torch.Tensor, x: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's squared gradients summed over a batch, for its weight [out, in] and its bias [out], from its
    output grads `g` [B, T, out] and inputs `x` [B, T, in]: of every sample's loss (`per_sample`), or of the batch's
    mean loss times B (batch mode).

    Per sample, the B weight gradients [B, out, in] are made at once while they take at most `AT_ONCE_BYTES`; above
    that (a large layer: 1 GB for a 4096 x 4096 weight and 16 samples) each sample's is made, squared and added in
    turn, one weight-sized tensor at a time: the same sum, its additions in sample order (torch's sum over B may
    group them otherwise, so the last bits can differ)."""
    if per_sample:
        batch, out, inputs = g.shape[0], g.shape[-1], x.shape[-1]
        if batch * out * inputs * 4 <= AT_ONCE_BYTES:
            weight = torch.einsum("bto,bti->boi", g, x).square_().sum(0)
        else:
            weight = torch.zeros(out, inputs, dtype=torch.float32, device=g.device)
            for g_n, x_n in zip(g, x):
                weight.add_(torch.einsum("to,ti->oi", g_n, x_n).square_())
        return weight, g.sum(1).square_().sum(0)
    batch = g.shape[0]
    weight = (torch.einsum("bto,bti->oi", g, x) / batch).square_() * float(batch)
    return weight, (g.sum((0, 1)) / batch).square_() * float(batch)


def estimate_fisher(
    model: nn.Module,
    dataset,
    collate_fn: Callable[[list], dict] | None = None,
    args: FisherArguments | None = None,
    keys: Sequence[str] | None = None,
    loss_fn: PerSampleLoss | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of `model` at its current weights over `dataset`.

    Args:
        model: a PEFT LoRA model (or any model whose merge keys are linear weights/biases).
        dataset: a map-style dataset of examples; `collate_fn` turns a list of them into a batch dict with `labels`.
        args: `FisherArguments` (mode, sample cap, batch size, labels, device).
        keys: merge keys to estimate (default: LoRA effective weights + fully trained linear parameters).
        loss_fn: `fn(model, batch) -> per-sample losses [B]` (default `per_sample_loss`).
        seed: seeds the sample cap's subset and sampled labels.
        show_progress: a tqdm bar on the main process.

    Returns:
        `{key: fp32 tensor}` shaped like each parameter: the mean over samples of the squared gradients.
    """
    args = args or FisherArguments()
    keys = list(keys) if keys is not None else default_fisher_keys(model)
    rank, world = process_rank_world()
    mine = _sample_order(len(dataset), args.fisher_max_samples, seed)[rank::world]
    if args.fisher_mode == "per_sample" and args.fisher_labels != "sampled":  # a sum over samples: any order
        mine = by_length(dataset, mine)
    device = next(unwrap(model).parameters()).device
    placement = placement_of(model)
    zeros = _zero_sums(model, keys, torch.device(args.fisher_device) if args.fisher_device else device, placement)
    sums = placement.fisher_sums(zeros)
    generator = torch.Generator().manual_seed(seed + 1 + rank)
    loss_fn = loss_fn or (lambda m, b: per_sample_loss(m, b, args.fisher_labels == "sampled", generator))
    probes = _build_probes(model, keys)
    sums.check(args.fisher_mode == "per_sample", any(p.transpose for p in probes.values()))
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch, real in tqdm(sums.batches(mine, args.fisher_batch_size, device), desc="Fisher",
                                disable=not show_progress or rank != 0, leave=False):  # fmt: skip
            batch = collate_fn([dataset[i] for i in batch])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            for p in probes.values():
                p.clear()
            losses = loss_fn(model, batch)
            _accumulate(probes, sums.weigh(losses, real), args.fisher_mode == "per_sample", sums)
            count += sums.count(losses, real)
    finally:
        for p in probes.values():
            p.handle.remove()
            p.clear()
        model.train(was_training)
    return sums.mean(count)


def token_lengths(dataset, indices: Sequence[int]) -> list[int] | None:
    """The token count of each of `indices`' examples, read from the `input_ids` column as stored (no transform
    runs); None when the examples have no `input_ids` (images: one size)."""
    if isinstance(dataset, datasets.Dataset):
        if "input_ids" not in dataset.column_names:
            return None
        return [len(ids) for ids in dataset.with_format(None).select(indices)["input_ids"]]
    if isinstance(dataset, list) and all(isinstance(e, Mapping) and "input_ids" in e for e in dataset):
        return [len(dataset[i]["input_ids"]) for i in indices]
    return None


def by_length(dataset, indices: Sequence[int]) -> list[int]:
    """`indices` longest example first (ties in their given order), so that a batch pads its examples to nearly their
    own length: a pass whose result does not depend on the order (a sum over samples, features per sample) computes
    ~40% fewer padded tokens on text of varied length. Unchanged when the lengths cannot be read."""
    lengths = token_lengths(dataset, indices)
    if lengths is None:
        return list(indices)
    return [i for _, i in sorted(zip(lengths, indices), key=lambda pair: -pair[0])]


def fisher_sample(dataset, cap: int | None, seed: int):
    """The samples a Fisher pass with this cap and seed uses (all of them, or the same seeded subset), as a list."""
    return [dataset[i] for i in _sample_order(len(dataset), cap, seed)]


def _sample_order(n: int, cap: int | None, seed: int) -> list[int]:
    """The samples of the pass: all of them in order, or a seeded random subset of `cap`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:cap] if cap else list(range(n))


def _zero_sums(model: nn.Module, keys: list[str], device: torch.device, placement: Replicated) -> dict:
    """fp32 zero accumulators shaped like each key's parameter (a LoRA key: its layer's base weight), split as it is."""
    if not keys:
        raise ValueError("no parameters to estimate the Fisher of: the model has no LoRA layer or trainable module.")
    params = {strip_prefix(n): p for n, p in unwrap(model).named_parameters()}
    bases = base_weights(model)
    unknown = [k for k in keys if k not in bases and k not in params]
    if unknown:
        raise ValueError(f"Fisher keys {unknown} are neither LoRA layers nor parameters of the model.")
    like = {k: bases[k] if k in bases else placement.as_rows(params[k]) for k in keys}
    return {k: placement.zeros(w, device) for k, w in like.items()}


def normalize_fisher(
    fisher: Mapping[str, torch.Tensor], mode: str = "mean", inplace: bool = False
) -> dict[str, torch.Tensor]:
    """Rescale a Fisher so that its mean over all entries is 1 ('mean'), or return it unchanged ('none'); `inplace`
    rescales the given tensors (a caller that owns them: no second copy of the Fisher)."""
    if mode == "none":
        return dict(fisher)
    if mode != "mean":
        raise ValueError(f"`fisher_normalize` = {mode!r} is invalid: use 'none' or 'mean'.")
    total = sum(scalar(v.double().sum()) for v in fisher.values())
    numel = sum(v.numel() for v in fisher.values())
    if total <= 0:
        return dict(fisher)
    return {k: v.mul_(numel / total) if inplace else v * (numel / total) for k, v in fisher.items()}
