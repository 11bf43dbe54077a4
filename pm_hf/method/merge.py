"""Merge math as pure functions over `dict[str, Tensor]` (no model in sight).

Conventions (docs/method.md, stage 2). For task t with task vector Delta = theta*_t - theta_hat_{t-1} and diagonal
Fisher F_t, the two fp32 accumulators are

    S = sum_{i<t} F_i                 G = sum_{i<t} F_i * (theta_hat_{t-1} - theta*_i)

and the closed-form merging coefficient that minimises sum_{i<=t} 1/2 (theta_hat_t - theta*_i)^T F_i (...) over
theta_hat_t = theta_hat_{t-1} + alpha * Delta is

    alpha_t = (sum F_t Delta^2 - sum G Delta) / sum (S + F_t) Delta^2.

All sums run over every key of `deltas`. The merge strategies that use these pieces are in `pm_hf.method.strategies`;
`TaskVector` and `LoraFactors` are the plain tensor containers they exchange with the model side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..config.checks import NonFiniteError
from ..distributed.sharding import Scratch, all_finite, as_float64, dot64, zeros_like

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


def _check_same_keys(deltas: TensorDict, finite: bool = True, **others: TensorDict) -> None:
    """Raise ValueError unless every dict has exactly the keys of `deltas` with matching shapes (and, with `finite`,
    finite values: one pass over every tensor; `alpha_terms` skips it and checks its own sums instead)."""
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
    if finite:
        _check_finite_values(deltas, **others)


def _check_finite_values(deltas: TensorDict, **others: TensorDict) -> None:
    for name, tensors in {"deltas": deltas, **others}.items():
        for key, value in tensors.items():
            if not all_finite(value):
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
    return sum_terms(alpha_terms_by_key(deltas, fisher, S, G).values())


def alpha_terms_by_key(deltas: TensorDict, fisher: TensorDict, S: TensorDict, G: TensorDict) -> dict[str, AlphaTerms]:
    """The closed form's three sums of every key alone (one float64 pass over each key's four tensors); any group's
    terms are their `sum_terms` (the per-module alphas of `alpha_granularity: module` need no second pass).

    The inputs are checked finite through these sums: a NaN or inf entry in any of the four tensors makes one of its
    key's sums NaN or inf (0 * inf is NaN), and float64 does not overflow on float32 or bfloat16 values, so only
    then is every entry looked at, to name the tensor in the error (ValueError, as `update_accumulators`)."""
    _check_same_keys(deltas, finite=False, fisher=fisher, S=S, G=G)
    out, scratch = {}, Scratch(3, torch.float64).reserve(deltas.values())
    for key, delta in deltas.items():
        out[key] = _key_terms(delta, fisher[key], S[key], G[key], scratch)
    if not all(math.isfinite(x) for t in out.values() for x in (t.fisher_delta_sq, t.g_delta, t.denominator)):
        _check_finite_values(deltas, fisher=fisher, S=S, G=G)
    return out


def _key_terms(delta: torch.Tensor, f: torch.Tensor, s: torch.Tensor, g: torch.Tensor, scratch: Scratch) -> AlphaTerms:
    """One key's sums as float64 dot products (no product tensor is formed for whole tensors: each is converted into
    `scratch`'s buffers; split ones sum across ranks); <S + F, Delta^2> = <S, Delta^2> + <F, Delta^2>."""
    views = scratch.take(delta, f, s, g)
    if views is None:  # split rows: elementwise products summed across ranks
        d = as_float64(delta)
        d2 = d * d
        fd2 = dot64(f, d2)
        return AlphaTerms(fd2, dot64(g, d), dot64(s, d2) + fd2)
    d, d2, x = (v.reshape(-1) for v in views)
    torch.mul(d.copy_(delta.detach().reshape(-1)), d, out=d2)
    dot = lambda t, y: float(torch.dot(x.copy_(t.detach().reshape(-1)), y))  # noqa: E731 - t in float64, exactly
    fd2 = dot(f, d2)
    return AlphaTerms(fd2, dot(g, d), dot(s, d2) + fd2)


def sum_terms(terms) -> AlphaTerms:
    """The closed form's sums over several keys' `AlphaTerms` (added in the order given, from 0.0)."""
    fd2 = gd = den = 0.0
    for t in terms:
        fd2 += t.fisher_delta_sq
        gd += t.g_delta
        den += t.denominator
    return AlphaTerms(fd2, gd, den)


def closed_form_alpha(deltas: TensorDict, fisher: TensorDict, S: TensorDict, G: TensorDict) -> float:
    """The raw (unclamped) closed-form alpha of docs/method.md: (sum F Delta^2 - sum G Delta) / sum (S + F) Delta^2.

    Args: as `alpha_terms`. Returns: a float; nan when the denominator is exactly zero (see `select_alpha`).
    For the first task (S = G = 0) this is exactly 1.
    """
    return alpha_terms(deltas, fisher, S, G).raw


def update_accumulators(
    deltas: TensorDict,
    fisher: TensorDict,
    S: TensorDict,
    G: TensorDict,
    alpha: float | Mapping[str, float],
    checked: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Accumulators after merging theta_hat_t = theta_hat_{t-1} + alpha * Delta.

        G <- G + alpha * S * Delta + (alpha - 1) * F * Delta ;   S <- S + F

    Args:
        deltas, fisher, S, G: as `alpha_terms`.
        alpha: the alpha actually applied (after clamping): one float, or one float or per-parameter tensor per key.
        checked: the four dicts' values were already checked finite (by `alpha_terms` on the same dicts): skip that.

    Returns:
        New `(S, G)` dicts (inputs are not modified), in the dtype and device of `S` and `G`, computed in fp32.
    """
    new_S, new_G = {}, {}
    for key, s, g in accumulator_updates(deltas, fisher, S, G, alpha, checked):
        new_S[key], new_G[key] = s, g
    return new_S, new_G


def accumulator_updates(
    deltas: TensorDict,
    fisher: TensorDict,
    S: TensorDict,
    G: TensorDict,
    alpha,
    checked: bool = False,
    in_place: bool = False,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """`update_accumulators` one key at a time: `(key, new S, new G)`, each computed when it is asked for, so that a
    caller that replaces its S and G as it goes holds one key's old and new values at a time, not both whole sets.
    With `in_place`, fp32 S and G tensors that are not split are updated where they are (the same bits, no new
    memory: the yielded tensors are `S[key]` and `G[key]`). Every key's alpha is checked before the first is yielded
    or written: a caller never stops with S and G half replaced."""
    _check_same_keys(deltas, finite=not checked, fisher=fisher, S=S, G=G)
    for key in deltas:
        _check_alpha(alpha[key] if isinstance(alpha, Mapping) else alpha, key)
    scratch = Scratch(2, torch.float32).reserve(S.values()) if in_place else None  # G's two products
    for key, delta in deltas.items():
        a = alpha[key] if isinstance(alpha, Mapping) else alpha
        s, g = S[key], G[key]
        # per-parameter alpha: the same identity holds elementwise
        a = a.to(s.device, s.dtype) if isinstance(a, torch.Tensor) else float(a)
        acc = torch.promote_types(s.dtype, torch.float32)  # at least fp32, whatever the storage dtype
        s32, g32 = s.to(acc), g.to(acc)
        a = a.to(acc) if isinstance(a, torch.Tensor) else a
        d = delta.to(s.device, acc)
        f = fisher[key].to(s.device, acc)
        stored = scratch is not None and s32 is s and g32 is g and s.dtype == g.dtype == scratch.dtype  # fp32
        products = scratch.take(s, g, f, d) if stored else None
        if products is not None:
            yield key, *_update_in_place(s, g, f, d, a, *products)
        else:
            yield key, (s32 + f).to(s.dtype), (g32 + a * s32 * d + (a - 1.0) * f * d).to(g.dtype)


def _update_in_place(s, g, f, d, a, sd, fd) -> tuple[torch.Tensor, torch.Tensor]:
    """g <- g + a * s * d + (a - 1) * f * d (in that order: the bits of the expression), then s <- s + f; the two
    products in the buffers `sd` and `fd`."""
    torch.mul(s, a, out=sd).mul_(d)
    torch.mul(f, a - 1.0, out=fd).mul_(d)
    g.add_(sd).add_(fd)
    return s.add_(f), g


def _check_alpha(a, key: str) -> None:
    """The alpha applied to `key` (a float, or a per-parameter tensor) is finite (ValueError naming the key)."""
    if isinstance(a, torch.Tensor):
        if not all_finite(a):
            raise ValueError(f"`alpha` for {key!r} has non-finite entries; pass the finite alpha that was applied.")
    elif not math.isfinite(float(a)):
        raise ValueError(f"`alpha` for {key!r} is {float(a)}; pass the finite alpha that was applied.")


def zeros_like_dict(
    tensors: TensorDict, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Zero buffers shaped like `tensors` (the initial S and G; fp32 unless stored in bf16)."""
    return {k: zeros_like(v, dtype, device) for k, v in tensors.items()}


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
    if not all(math.isfinite(x) for x in (terms.fisher_delta_sq, terms.g_delta, terms.denominator)):
        raise NonFiniteError(f"the closed form's sums are not finite ({terms}): the task vector or Fisher overflowed.")
    if terms.degenerate:
        return AlphaChoice(1.0, terms.raw, fallback=True)
    raw = terms.raw
    alpha = min(max(raw, alpha_min), 1.0) if clip else raw
    return AlphaChoice(alpha, raw)


# ------------------------------------------------------------------- calibrated closed forms (docs/method.md)
def secant_kappa(target: float, fisher_delta_sq: float) -> float:
    """kappa_t = target / <F_t, Delta_t^2>: the scale that makes task t's quadratic model (1/2)(1 - alpha)^2 <kappa F_t,
    Delta^2> pass through a measured loss increase (target = 2 dL_t for the secant at alpha = 0, or c_t of
    `branch_secant`). 0 when nothing was lost (target <= 0) or the Fisher sees no curvature along Delta."""
    if not math.isfinite(target) or not math.isfinite(fisher_delta_sq):
        raise NonFiniteError(f"the secant calibration is not finite (target {target}, <F, Delta^2> {fisher_delta_sq}).")
    if target <= 0.0 or fisher_delta_sq <= 0.0:
        return 0.0
    return target / fisher_delta_sq


def branch_secant(loss_minus: float | None, loss_zero: float | None, eps: float) -> float | None:
    """c_t = 2 (L_minus - L_0) / eps^2 from the late training losses of the perturbation's branches b = -1 (adapter at
    1 - eps) and b = 0: the secant over [1 - eps, 1], in place of 2 dL_t. None when a branch has no loss or c_t <= 0."""
    if loss_minus is None or loss_zero is None or eps <= 0:
        return None
    c = 2.0 * (loss_minus - loss_zero) / eps**2
    return c if math.isfinite(c) and c > 0 else None


def curve_alpha(
    grid: Sequence[float], losses: Sequence[float], g_delta: float, s_delta_sq: float
) -> tuple[float, list]:
    """alpha_t = argmin over `grid` of [L_t(alpha) - L_t(1)] + alpha <G, Delta> + (1/2) alpha^2 <S, Delta^2>: the new
    task's measured loss along alpha plus the old tasks' quadratic loss increase. `losses[i]` is L_t(grid[i]); the
    grid must hold 1. Returns (alpha, the objective at each grid point); ties go to the larger alpha."""
    if len(grid) != len(losses) or 1.0 not in grid:
        raise ValueError("the curve needs one loss per grid point, and the grid must contain alpha = 1.")
    at_one = losses[list(grid).index(1.0)]
    objective = [(loss - at_one) + a * g_delta + 0.5 * a * a * s_delta_sq for a, loss in zip(grid, losses)]
    if not all(math.isfinite(v) for v in objective):
        raise NonFiniteError(f"the measured loss curve is not finite: {losses}")
    best = min(range(len(grid)), key=lambda i: (objective[i], -grid[i]))
    return float(grid[best]), objective


def compress_factors(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` approximation of B @ A in Frobenius norm, computed on the factors (QR of each, then the
    SVD of an R x R matrix), and its relative error ||BA - B'A'|| / ||BA|| (0 for a zero product).

    Args: A [R, d_in], B [d_out, R]. Returns: A' [k, d_in], B' [d_out, k] (fp32, k = min(rank, R)), the error."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    k = min(rank, S.numel())
    total = float(S.square().sum())
    error = (float(S[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return (Qa @ Vh[:k].T).T.float(), (Qb @ U[:, :k] * S[:k]).float(), error


# ------------------------------------------------------------------- per-parameter pieces of the baselines
def cofima_weights(fisher: torch.Tensor, S: torch.Tensor, alpha: float) -> torch.Tensor:
    """CoFiMA's per-parameter weight of the new task: w = a F / ((1 - a) S + a F); w = a where both are 0."""
    num = alpha * fisher.double()
    den = (1.0 - alpha) * S.double() + num
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, alpha)).float()


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


# --------------------------------------------------------------------------------------- tensor containers
@dataclass(frozen=True)
class LoraFactors:
    """One adapted layer's trained adapter: Delta W = scaling * B @ A (transposed when `fan_in_fan_out`)."""

    A: torch.Tensor  # [r, d_in], fp32 on CPU
    B: torch.Tensor  # [d_out, r]
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in fp32, in the layout of the base weight."""
        d = (self.B.float() @ self.A.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass
class TaskVector:
    """What training task t produced, by merge key (docs/method.md, "Which parameters, which space").

    `lora`: Delta W = s B A of each adapted layer. `full`: trained minus starting value of each fully trained
    parameter that is merged (class-head rows only where a class was trained before, see `pm_hf.heads.head`).
    `trained`: the trained values of the fully trained parameters outside the class head, and `adapter` the
    trained adapter's factors: what a strategy that continues training from theta*_t keeps, and the exact export
    record of the task.
    """

    lora: dict[str, torch.Tensor]
    full: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor]
    adapter: dict[str, LoraFactors]

    @property
    def deltas(self) -> dict[str, torch.Tensor]:
        """Delta_t over every merged key: the adapted layers first, then the fully trained parameters."""
        return {**self.lora, **self.full}
