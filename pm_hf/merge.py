"""Merge math as pure functions over `dict[str, Tensor]` (no model in sight).

Conventions (METHOD.md, stage 2). For task t with task vector Delta = theta*_t - theta_hat_{t-1} and diagonal
Fisher F_t, the two fp32 accumulators are

    S = sum_{i<t} F_i                 G = sum_{i<t} F_i * (theta_hat_{t-1} - theta*_i)

and the closed-form merging coefficient that minimises sum_{i<=t} 1/2 (theta_hat_t - theta*_i)^T F_i (...) over
theta_hat_t = theta_hat_{t-1} + alpha * Delta is

    alpha_t = (sum F_t Delta^2 - sum G Delta) / sum (S + F_t) Delta^2.

All sums run over every key of `deltas`. Merge rules are registered by name in `MERGE_RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

TensorDict = Mapping[str, torch.Tensor]

# Denominators at or below this (relative to the scale of the numerator terms) count as degenerate.
DEGENERATE_DENOMINATOR = 1e-12


@dataclass(frozen=True)
class AlphaTerms:
    """The three sums of the closed form, kept for logging. alpha_raw = (fisher_delta_sq - g_delta) / denominator."""

    fisher_delta_sq: float  # sum F_t Delta^2
    g_delta: float  # sum G Delta
    denominator: float  # sum (S + F_t) Delta^2

    @property
    def raw(self) -> float:
        """The unclamped closed-form alpha; nan when the denominator is zero."""
        if self.denominator == 0.0:
            return math.nan
        return (self.fisher_delta_sq - self.g_delta) / self.denominator

    @property
    def degenerate(self) -> bool:
        """True when the denominator is ~0 (no curvature along Delta, or Delta = 0)."""
        scale = max(abs(self.fisher_delta_sq), abs(self.g_delta), 1e-30)
        return not math.isfinite(self.denominator) or self.denominator <= DEGENERATE_DENOMINATOR * scale


def _check_same_keys(deltas: TensorDict, **others: TensorDict) -> None:
    """Raise ValueError unless every dict has exactly the keys of `deltas` with matching shapes and finite values."""
    if not deltas:
        raise ValueError("`deltas` is empty: there is nothing to merge; pass at least one task-vector tensor.")
    for name, other in others.items():
        missing, extra = set(deltas) - set(other), set(other) - set(deltas)
        if missing or extra:
            raise ValueError(
                f"`{name}` keys do not match `deltas`: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}; "
                "build every dict over the same merged parameters."
            )
        for key, delta in deltas.items():
            if other[key].shape != delta.shape:
                raise ValueError(
                    f"`{name}[{key!r}]` has shape {tuple(other[key].shape)} but the delta has {tuple(delta.shape)}."
                )
    for name, tensors in {"deltas": deltas, **others}.items():
        for key, value in tensors.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"`{name}[{key!r}]` contains NaN or inf; check the training run and the Fisher pass.")


def alpha_terms(deltas: TensorDict, fisher: TensorDict, S: TensorDict, G: TensorDict) -> AlphaTerms:
    """The sums of the closed form, accumulated in float64.

    Args:
        deltas: task vector Delta_t per merged parameter.
        fisher: diagonal Fisher F_t of the task, same keys and shapes.
        S: accumulator sum_{i<t} F_i.
        G: accumulator sum_{i<t} F_i * (theta_hat_{t-1} - theta*_i).

    Returns:
        `AlphaTerms` with sum F Delta^2, sum G Delta and sum (S + F) Delta^2.
    """
    _check_same_keys(deltas, fisher=fisher, S=S, G=G)
    fd2 = gd = den = 0.0
    for key, delta in deltas.items():
        d = delta.double()
        d2 = d * d
        f = fisher[key].to(d.device, torch.float64)
        fd2 += float((f * d2).sum())
        gd += float((G[key].to(d.device, torch.float64) * d).sum())
        den += float(((S[key].to(d.device, torch.float64) + f) * d2).sum())
    return AlphaTerms(fd2, gd, den)


def closed_form_alpha(deltas: TensorDict, fisher: TensorDict, S: TensorDict, G: TensorDict) -> float:
    """The raw (unclamped) closed-form alpha of METHOD.md: (sum F Delta^2 - sum G Delta) / sum (S + F) Delta^2.

    Args: as `alpha_terms`. Returns: a float; nan when the denominator is exactly zero (see `select_alpha`).
    For the first task (S = G = 0) this is exactly 1.
    """
    return alpha_terms(deltas, fisher, S, G).raw


def update_accumulators(
    deltas: TensorDict, fisher: TensorDict, S: TensorDict, G: TensorDict, alpha: float | Mapping[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Accumulators after merging theta_hat_t = theta_hat_{t-1} + alpha * Delta.

        G <- G + alpha * S * Delta + (alpha - 1) * F * Delta ;   S <- S + F

    Args:
        deltas, fisher, S, G: as `alpha_terms`.
        alpha: the alpha actually applied (after clamping), one float or one per key.

    Returns:
        New `(S, G)` dicts (inputs are not modified), in the dtype and device of `S` and `G`.
    """
    _check_same_keys(deltas, fisher=fisher, S=S, G=G)
    new_S, new_G = {}, {}
    for key, delta in deltas.items():
        a = float(alpha[key]) if isinstance(alpha, Mapping) else float(alpha)
        if not math.isfinite(a):
            raise ValueError(f"`alpha` for {key!r} is {a}; pass the finite alpha that was applied.")
        s, g = S[key], G[key]
        d = delta.to(s.device, s.dtype)
        f = fisher[key].to(s.device, s.dtype)
        new_G[key] = g + a * s * d + (a - 1.0) * f * d
        new_S[key] = s + f
    return new_S, new_G


def zeros_like_dict(tensors: TensorDict, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """fp32 zero buffers shaped like `tensors` (the initial S and G)."""
    return {k: torch.zeros(v.shape, dtype=torch.float32, device=device or v.device) for k, v in tensors.items()}


@dataclass(frozen=True)
class AlphaChoice:
    """The alpha applied, the raw value and why (for logging)."""

    alpha: float
    raw: float
    fallback: bool = False  # True when the degenerate-denominator rule chose alpha = 1


def select_alpha(terms: AlphaTerms, clip: bool = True, alpha_min: float = 0.0) -> AlphaChoice:
    """Clamping and the degenerate-denominator rule on top of the raw closed form.

    Args:
        terms: the closed-form sums.
        clip: clamp to [alpha_min, 1].
        alpha_min: lower bound when clipping.

    Returns:
        `AlphaChoice`; alpha = 1 when the denominator is ~0 (nothing along Delta to trade off).
    """
    if terms.degenerate:
        return AlphaChoice(1.0, terms.raw, fallback=True)
    raw = terms.raw
    alpha = min(max(raw, alpha_min), 1.0) if clip else raw
    return AlphaChoice(alpha, raw)


# ----------------------------------------------------------------------------------------------- registry
@dataclass
class MergeContext:
    """What a merge rule may look at. `task_index` is 1-based (t); fisher/S/G are None for rules that skip them."""

    deltas: TensorDict
    task_index: int
    fisher: TensorDict | None = None
    S: TensorDict | None = None
    G: TensorDict | None = None
    alpha: float = 1.0  # the configured fixed alpha
    clip: bool = True
    alpha_min: float = 0.0
    granularity: str = "global"
    module_of: Callable[[str], str] | None = None  # parameter key -> module name (per-module alpha)


@dataclass
class MergeRule:
    """A named way to choose alpha. `needs_fisher` tells the loop whether a Fisher pass is required."""

    name: str
    fn: Callable[[MergeContext], dict[str, AlphaChoice]]
    needs_fisher: bool
    reference: str


MERGE_RULES: dict[str, MergeRule] = {}


def register_merge_rule(name: str, needs_fisher: bool, reference: str):
    """Decorator: register `fn(ctx) -> {key: AlphaChoice}` (one entry per delta key) under `name`."""

    def wrap(fn):
        if name in MERGE_RULES:
            raise ValueError(f"merge rule {name!r} is already registered")
        MERGE_RULES[name] = MergeRule(name, fn, needs_fisher, reference)
        return fn

    return wrap


def get_merge_rule(name: str) -> MergeRule:
    if name not in MERGE_RULES:
        raise ValueError(f"`merge_method` = {name!r} is not a registered merge rule; use one of {sorted(MERGE_RULES)}.")
    return MERGE_RULES[name]


def _groups(ctx: MergeContext) -> dict[str, list[str]]:
    if ctx.granularity == "global":
        return {"all": list(ctx.deltas)}
    module_of = ctx.module_of or (lambda key: key.rsplit(".", 1)[0])
    groups: dict[str, list[str]] = {}
    for key in ctx.deltas:
        groups.setdefault(module_of(key), []).append(key)
    return groups


@register_merge_rule("pm", needs_fisher=True, reference="Qiu et al. 2025, P&M closed-form alpha (METHOD.md)")
def _pm_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    if ctx.fisher is None or ctx.S is None or ctx.G is None:
        raise ValueError("merge rule 'pm' needs the Fisher and the S/G accumulators")
    out = {}
    for keys in _groups(ctx).values():
        terms = alpha_terms(*({k: d[k] for k in keys} for d in (ctx.deltas, ctx.fisher, ctx.S, ctx.G)))
        choice = select_alpha(terms, ctx.clip, ctx.alpha_min)
        out.update({k: choice for k in keys})
    return out


@register_merge_rule("fixed", needs_fisher=False, reference="constant alpha; alpha=1 is sequential LoRA with merging")
def _fixed_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    choice = AlphaChoice(float(ctx.alpha), float(ctx.alpha))
    return {k: choice for k in ctx.deltas}


@register_merge_rule(
    "seq-merge", needs_fisher=False, reference="sequential LoRA merged with alpha=1 (the paper's 'LoRA' row)"
)
def _seq_merge_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    return {k: AlphaChoice(1.0, 1.0) for k in ctx.deltas}


@register_merge_rule(
    "average", needs_fisher=False, reference="model averaging: theta_hat_t = mean of theta*_i (alpha_t = 1/t)"
)
def _average_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    a = 1.0 / ctx.task_index
    return {k: AlphaChoice(a, a) for k in ctx.deltas}


@register_merge_rule(
    "coma", needs_fisher=False, reference="CoMA (Marouf et al. 2023): fixed-weight interpolation, alpha = `alpha`"
)
def _coma_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    return _fixed_rule(ctx)
