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
        alpha: the alpha actually applied (after clamping): one float, or one float or per-parameter tensor per key.

    Returns:
        New `(S, G)` dicts (inputs are not modified), in the dtype and device of `S` and `G`.
    """
    _check_same_keys(deltas, fisher=fisher, S=S, G=G)
    new_S, new_G = {}, {}
    for key, delta in deltas.items():
        a = alpha[key] if isinstance(alpha, Mapping) else alpha
        s, g = S[key], G[key]
        if isinstance(a, torch.Tensor):  # per-parameter alpha: the same identity holds elementwise
            if not torch.isfinite(a).all():
                raise ValueError(f"`alpha` for {key!r} has non-finite entries; pass the finite alpha that was applied.")
            a = a.to(s.device, s.dtype)
        else:
            a = float(a)
            if not math.isfinite(a):
                raise ValueError(f"`alpha` for {key!r} is {a}; pass the finite alpha that was applied.")
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
    """The alpha applied, the raw value and why (for logging).

    `weight`, when set, is a per-parameter alpha (same shape as the delta, e.g. CoFiMA's Fisher weights); `alpha` is
    then its effective value along the task vector, sum(w Delta^2) / sum(Delta^2), for logging.
    """

    alpha: float
    raw: float
    fallback: bool = False  # True when the degenerate-denominator rule chose alpha = 1
    weight: torch.Tensor | None = None

    @property
    def value(self) -> float | torch.Tensor:
        """What multiplies the delta: the tensor `weight` if set, else the float `alpha`."""
        return self.alpha if self.weight is None else self.weight


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
STARTS = ("merged", "pretrained", "chain")


@dataclass
class MergeContext:
    """What a merge rule may look at. `task_index` is 1-based (t); fisher/S/G are None for rules that skip them.

    Delta rules (`MergeRule.output == "delta"`) read `taus` (task vectors relative to the pretrained weights theta_0)
    and keep what they need across tasks in `state` (a dict of tensors the loop checkpoints); `score(alpha)` (rules
    with `needs_eval`) returns the held-out accuracy of the model merged with that alpha.
    """

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
    taus: TensorDict | None = None
    state: dict[str, torch.Tensor] | None = None
    score: Callable[[float], float] | None = None
    grid: tuple[float, ...] = tuple(i / 10 for i in range(11))
    density: float = 0.2  # TIES: fraction of each task vector kept


@dataclass
class MergeRule:
    """A named merge rule.

    - `output == "alpha"`: `fn(ctx) -> {key: AlphaChoice}`; the loop sets theta_hat_t = theta_hat_{t-1} + alpha * Delta.
    - `output == "delta"`: `fn(ctx) -> {key: D_t}`; the loop sets theta_hat_t = theta_0 + D_t.
    `start` says where task t trains from: "merged" (theta_hat_{t-1}, a fresh adapter), "pretrained" (theta_0, a fresh
    adapter: independent fine-tunes) or "chain" (the previous task's fine-tuned weights: one adapter continued).
    """

    name: str
    fn: Callable[[MergeContext], dict]
    needs_fisher: bool
    reference: str
    output: str = "alpha"
    start: str = "merged"
    needs_eval: bool = False


MERGE_RULES: dict[str, MergeRule] = {}


def register_merge_rule(
    name: str, needs_fisher: bool, reference: str, output: str = "alpha", start: str = "merged", needs_eval=False
):
    """Decorator: register a merge rule under `name` (see `MergeRule` for what `fn` returns)."""
    if output not in ("alpha", "delta") or start not in STARTS:
        raise ValueError(f"merge rule {name!r}: output must be 'alpha' or 'delta' and start one of {STARTS}")

    def wrap(fn):
        if name in MERGE_RULES:
            raise ValueError(f"merge rule {name!r} is already registered")
        MERGE_RULES[name] = MergeRule(name, fn, needs_fisher, reference, output, start, needs_eval)
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


def _constant(ctx: MergeContext, a: float) -> dict[str, AlphaChoice]:
    choice = AlphaChoice(float(a), float(a))
    return {k: choice for k in ctx.deltas}


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
    return _constant(ctx, ctx.alpha)


@register_merge_rule(
    "seq-merge", needs_fisher=False, reference="sequential LoRA merged with alpha=1 (the paper's 'LoRA' row)"
)
def _seq_merge_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    return _constant(ctx, 1.0)


@register_merge_rule(
    "average", needs_fisher=False, reference="model averaging: theta_hat_t = mean of theta*_i (alpha_t = 1/t)"
)
def _average_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    return _constant(ctx, 1.0 / ctx.task_index)


@register_merge_rule(
    "coma", needs_fisher=False, reference="CoMA (Marouf et al. 2023): fixed-weight interpolation, alpha = `alpha`"
)
def _coma_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    return _constant(ctx, ctx.alpha)


def cofima_weights(fisher: torch.Tensor, S: torch.Tensor, alpha: float) -> torch.Tensor:
    """CoFiMA's per-parameter weight of the new task: w = a F / ((1 - a) S + a F); w = a where both are 0."""
    num = alpha * fisher.double()
    den = (1.0 - alpha) * S.double() + num
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, alpha)).float()


@register_merge_rule(
    "cofima",
    needs_fisher=True,
    reference="CoFiMA (Marouf et al. 2024): theta_t = ((1-a) S theta_{t-1} + a F_t theta*_t) / ((1-a) S + a F_t), "
    "S = sum of past Fishers, a = `alpha`",
)
def _cofima_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    if ctx.fisher is None or ctx.S is None:
        raise ValueError("merge rule 'cofima' needs the Fisher and the S accumulator")
    weights = {k: cofima_weights(ctx.fisher[k], ctx.S[k].to(ctx.fisher[k].device), ctx.alpha) for k in ctx.deltas}
    num = sum(float((weights[k].double() * ctx.deltas[k].double() ** 2).sum()) for k in ctx.deltas)
    den = sum(float((ctx.deltas[k].double() ** 2).sum()) for k in ctx.deltas)
    effective = num / den if den > 0 else float(ctx.alpha)
    return {k: AlphaChoice(effective, effective, weight=weights[k]) for k in ctx.deltas}


@register_merge_rule(
    "oracle-alpha",
    needs_fisher=False,
    needs_eval=True,
    reference="upper bound of the closed form: per task, the grid alpha with the best held-out accuracy on all seen "
    "tasks (first best on ties)",
)
def _oracle_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    if ctx.score is None:
        raise ValueError("merge rule 'oracle-alpha' needs a score(alpha) function")
    if ctx.task_index == 1:
        return _constant(ctx, 1.0)  # nothing to trade off yet
    scores = [(ctx.score(a), a) for a in ctx.grid]
    best = max(scores, key=lambda sa: sa[0])[1]
    return _constant(ctx, best)


@register_merge_rule(
    "joint", needs_fisher=False, reference="joint training on all tasks' data at once (the upper bound of the sequence)"
)
def _joint_rule(ctx: MergeContext) -> dict[str, AlphaChoice]:
    return _constant(ctx, 1.0)  # the loop turns the stream into one task


# Delta rules: theta_hat_t = theta_0 + D_t, over task vectors tau relative to theta_0.
def ties_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude (at least one), zero the rest."""
    k = max(1, int(round(density * tau.numel())))
    if k >= tau.numel():
        return tau.clone()
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES elect + disjoint mean over already trimmed task vectors: sign = sign(sum), mean over agreeing entries."""
    stacked = torch.stack([t.float() for t in taus])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0).clamp_min(1)
    return (stacked * agree).sum(0) / count


def magmax_update(current: torch.Tensor | None, tau: torch.Tensor) -> torch.Tensor:
    """Per parameter, keep the entry of largest magnitude seen so far (earlier tasks win exact ties)."""
    if current is None:
        return tau.float().clone()
    return torch.where(tau.abs() > current.abs(), tau.float(), current)


def _need_taus(ctx: MergeContext, name: str) -> tuple[TensorDict, dict[str, torch.Tensor]]:
    if ctx.taus is None or ctx.state is None:
        raise ValueError(f"merge rule {name!r} needs the task vectors `taus` and a `state` dict")
    return ctx.taus, ctx.state


@register_merge_rule(
    "seq",
    needs_fisher=False,
    output="delta",
    start="chain",
    reference="sequential fine-tuning: one LoRA continued through all tasks, never merged (theta_hat_t = theta*_t)",
)
def _seq_rule(ctx: MergeContext) -> dict[str, torch.Tensor]:
    taus, _ = _need_taus(ctx, "seq")
    return {k: v.float() for k, v in taus.items()}


@register_merge_rule(
    "task-arithmetic",
    needs_fisher=False,
    output="delta",
    start="pretrained",
    reference="Task arithmetic (Ilharco et al. 2023): independent fine-tunes, theta_0 + alpha * sum_i tau_i",
)
def _task_arithmetic_rule(ctx: MergeContext) -> dict[str, torch.Tensor]:
    taus, state = _need_taus(ctx, "task-arithmetic")
    out = {}
    for k, tau in taus.items():
        total = state.get(f"sum/{k}")
        state[f"sum/{k}"] = tau.float().clone() if total is None else total + tau.float()
        out[k] = ctx.alpha * state[f"sum/{k}"]
    return out


@register_merge_rule(
    "ties",
    needs_fisher=False,
    output="delta",
    start="pretrained",
    reference="TIES-merging (Yadav et al. 2023): trim to `density` per tensor, elect sign, disjoint mean, times alpha; "
    "keeps every trimmed task vector (memory grows with t)",
)
def _ties_rule(ctx: MergeContext) -> dict[str, torch.Tensor]:
    taus, state = _need_taus(ctx, "ties")
    t = ctx.task_index
    out = {}
    for k, tau in taus.items():
        state[f"tau{t}/{k}"] = ties_trim(tau.float(), ctx.density)
        out[k] = ctx.alpha * ties_merge([state[f"tau{i}/{k}"] for i in range(1, t + 1)])
    return out


@register_merge_rule(
    "magmax",
    needs_fisher=False,
    output="delta",
    start="chain",
    reference="MagMax (Marczak et al. 2024): sequential fine-tuning, per parameter the cumulative task vector entry "
    "of largest magnitude, times alpha",
)
def _magmax_rule(ctx: MergeContext) -> dict[str, torch.Tensor]:
    taus, state = _need_taus(ctx, "magmax")
    out = {}
    for k, tau in taus.items():
        state[f"max/{k}"] = magmax_update(state.get(f"max/{k}"), tau)
        out[k] = ctx.alpha * state[f"max/{k}"]
    return out
