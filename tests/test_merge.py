"""Tests of the closed-form merge math of docs/method.md, stage 2 (`pm_hf.method.merge`), and the per-parameter pieces
of
the baselines, each against brute force or a hand example."""

from __future__ import annotations

import math
import re

import pytest
import torch

from pm_hf.method.merge import (
    AlphaChoice,
    AlphaTerms,
    accumulator_updates,
    alpha_terms,
    closed_form_alpha,
    select_alpha,
    update_accumulators,
    zeros_like_dict,
)

D = torch.float64
# Keys of different shapes; modules (default module_of = key minus last component): enc.q, enc.v, pooler.dense.
SHAPES = {"enc.q.weight": (4, 3), "enc.q.bias": (4,), "enc.v.weight": (2, 5), "pooler.dense.weight": (3, 3)}


def _randn(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=gen, dtype=D) for k, s in SHAPES.items()}


def _fisher(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    # Positive, with a different magnitude per key so per-module alphas differ.
    return {
        k: scale * 3.0**i * (torch.rand(s, generator=gen, dtype=D) + 0.05) for i, (k, s) in enumerate(SHAPES.items())
    }


def _zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=D) for k, s in SHAPES.items()}


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in SHAPES])


def _simulate(seed: int, kinds: list[str]) -> list[dict]:
    """Run tasks through the accumulators, storing every theta*_i and F_i explicitly (the paper's O(T) form).

    kind 'rand': random Delta; 'toward'/'away': Delta = -/+ 0.25 G/S (towards / away from the Fisher-weighted mean of
    the past optima) with a tiny F_t, which forces raw alpha ~ 4 > 1 / raw alpha < 0, so the clamp bites.
    """
    gen = torch.Generator().manual_seed(seed)
    theta, S, G = _randn(gen), _zeros(), _zeros()
    optima, fishers, records = [], [], []
    for kind in kinds:
        if kind == "rand":
            delta, fisher = _randn(gen), _fisher(gen)
        else:
            sign = -1.0 if kind == "toward" else 1.0
            delta, fisher = {k: sign * 0.25 * G[k] / S[k] for k in SHAPES}, _fisher(gen, scale=1e-4)
        optima.append({k: theta[k] + delta[k] for k in SHAPES})
        fishers.append(fisher)
        choice = select_alpha(alpha_terms(delta, fisher, S, G))
        rec = dict(kind=kind, delta=delta, fisher=fisher, S=S, G=G, theta_prev=theta, choice=choice)
        rec.update(optima=list(optima), fishers=list(fishers), alpha=closed_form_alpha(delta, fisher, S, G))
        S, G = update_accumulators(delta, fisher, S, G, choice.alpha)
        theta = {k: theta[k] + choice.alpha * delta[k] for k in SHAPES}
        records.append(dict(rec, S_after=S, G_after=G, theta=theta))
    return records


def _objective(rec: dict, alphas: torch.Tensor) -> torch.Tensor:
    """sum_{i<=t} 1/2 (theta_hat_{t-1} + alpha Delta - theta*_i)^T F_i (...) for each alpha in `alphas`."""
    x = _flat(rec["theta_prev"])[None, :] + alphas[:, None] * _flat(rec["delta"])[None, :]
    return sum(0.5 * ((x - _flat(o)) ** 2 * _flat(f)).sum(1) for o, f in zip(rec["optima"], rec["fishers"]))


KINDS = ["rand", "rand", "toward", "rand", "away", "rand"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_first_task_alpha_is_exactly_one(seed):
    gen = torch.Generator().manual_seed(seed)
    delta, fisher = _randn(gen), _fisher(gen)
    assert closed_form_alpha(delta, fisher, _zeros(), _zeros()) == 1.0
    # Same with fp32 inputs and the fp32 zero buffers the training loop starts from.
    d32, f32 = {k: v.float() for k, v in delta.items()}, {k: v.float() for k, v in fisher.items()}
    S0 = zeros_like_dict(d32)
    assert all(v.dtype == torch.float32 and not v.any() for v in S0.values())
    assert closed_form_alpha(d32, f32, S0, zeros_like_dict(d32)) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulator_form_equals_direct_formula(seed):
    records = _simulate(seed, KINDS)
    for rec in records:
        delta, theta_prev = rec["delta"], rec["theta_prev"]
        num = den = 0.0
        for opt, fis in zip(rec["optima"], rec["fishers"]):
            num -= sum(float(((theta_prev[k] - opt[k]) * fis[k] * delta[k]).sum()) for k in SHAPES)
            den += sum(float((delta[k] * fis[k] * delta[k]).sum()) for k in SHAPES)
        assert rec["alpha"] == pytest.approx(num / den, rel=1e-10, abs=0)
        assert rec["choice"].raw == rec["alpha"]
        # Accumulators after the merge, against their definitions over the stored tasks.
        for k in SHAPES:
            g_direct = sum(f[k] * (rec["theta"][k] - o[k]) for o, f in zip(rec["optima"], rec["fishers"]))
            torch.testing.assert_close(rec["G_after"][k], g_direct, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(rec["S_after"][k], sum(f[k] for f in rec["fishers"]), rtol=1e-12, atol=0)
    by_kind = {r["kind"]: r for r in records}
    assert records[0]["alpha"] == 1.0
    # The clamp was exercised in both directions, so the G updates above used an applied alpha != raw alpha.
    assert by_kind["toward"]["alpha"] > 1.5 and by_kind["toward"]["choice"].alpha == 1.0
    assert by_kind["away"]["alpha"] < 0.0 and by_kind["away"]["choice"].alpha == 0.0


def test_alpha_minimises_the_quadratic_objective():
    for rec in _simulate(7, KINDS):
        a = rec["alpha"]
        lo, hi = min(-2.0, a - 1.0), max(3.0, a + 1.0)
        grid = torch.linspace(lo, hi, 5_001, dtype=D)
        assert abs(float(grid[_objective(rec, grid).argmin()]) - a) <= (hi - lo) / 5_000
        q = _objective(rec, torch.tensor([a, a - 1e-3, a + 1e-3], dtype=D))
        assert q[0] < q[1] and q[0] < q[2]


def test_hand_example_3x3():
    delta = {"w": torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, -1]], dtype=D)}
    fisher = {"w": torch.ones(3, 3, dtype=D)}
    S = {"w": torch.full((3, 3), 2.0, dtype=D)}
    G = {"w": torch.tensor([[3.0, 100, 0], [0, 1, -7], [5, 0, 0]], dtype=D)}  # entries where Delta = 0 cannot matter
    # sum F D^2 = 1 + 4 + 1 = 6;  sum G D = 3*1 + 1*2 + 0*(-1) = 5;  sum (S+F) D^2 = 3 * 6 = 18
    # alpha = (6 - 5) / 18 = 1/18
    assert alpha_terms(delta, fisher, S, G) == AlphaTerms(6.0, 5.0, 18.0)
    assert closed_form_alpha(delta, fisher, S, G) == 1 / 18
    # G <- G + a S D + (a - 1) F D with a = 0.5: diag 3 + 1 - 0.5 = 3.5, 1 + 2 - 1 = 2, 0 - 1 + 0.5 = -0.5; S <- 3.
    new_S, new_G = update_accumulators(delta, fisher, S, G, 0.5)
    torch.testing.assert_close(new_G["w"], torch.tensor([[3.5, 100, 0], [0, 2, -7], [5, 0, -0.5]], dtype=D))
    torch.testing.assert_close(new_S["w"], torch.full((3, 3), 3.0, dtype=D))


def _state(seed: int = 3):
    rec = _simulate(seed, ["rand", "rand", "rand"])[-1]
    return rec["delta"], rec["fisher"], rec["S"], rec["G"]


def test_input_errors_name_the_problem():
    delta, fisher, S, G = _state()
    with pytest.raises(ValueError, match="empty"):
        closed_form_alpha({}, {}, {}, {})
    with pytest.raises(ValueError, match="empty"):
        update_accumulators({}, {}, {}, {}, 1.0)
    missing = {k: v for k, v in fisher.items() if k != "enc.v.weight"}
    with pytest.raises(ValueError, match=re.escape("'enc.v.weight'")):
        closed_form_alpha(delta, missing, S, G)
    with pytest.raises(ValueError, match=re.escape("'extra.w'")):
        update_accumulators(delta, fisher, S, {**G, "extra.w": torch.zeros(2, dtype=D)}, 0.5)
    for key, shape in [("enc.q.bias", (5,)), ("enc.q.weight", (3, 4))]:  # transposed: same numel, wrong shape
        with pytest.raises(ValueError, match=re.escape(f"'{key}'")):
            alpha_terms(delta, fisher, {**S, key: torch.zeros(shape, dtype=D)}, G)
    for which in range(4):
        for value in (math.nan, math.inf, -math.inf):
            args = [dict(d) for d in (delta, fisher, S, G)]
            args[which]["enc.v.weight"] = args[which]["enc.v.weight"].clone()
            args[which]["enc.v.weight"][1, 2] = value
            with pytest.raises(ValueError, match=r"'enc\.v\.weight'.*NaN or inf"):
                alpha_terms(*args)
            with pytest.raises(ValueError, match="NaN or inf"):
                update_accumulators(*args, 0.5)


def test_degenerate_denominator_falls_back_to_one():
    delta, fisher, S, G = _state()
    zero = {k: torch.zeros_like(v) for k, v in delta.items()}
    assert math.isnan(closed_form_alpha(zero, fisher, S, G))
    for args in [(zero, fisher, S, G), (delta, zero, zero, zero), (delta, zero, zero, G)]:
        choice = select_alpha(alpha_terms(*args))
        assert (choice.alpha, choice.fallback) == (1.0, True)
    # A well-posed but tiny-scale problem is not degenerate: alpha is scale invariant.
    tiny = [{k: v * 1e-20 for k, v in d.items()} for d in (fisher, S, G)]
    choice = select_alpha(alpha_terms(delta, *tiny))
    assert not choice.fallback and choice.raw == pytest.approx(closed_form_alpha(delta, fisher, S, G), rel=1e-9)


def test_clamping():
    high, low = AlphaTerms(1.7, 0.0, 1.0), AlphaTerms(0.2, 0.5, 1.0)
    assert select_alpha(high) == select_alpha(high, alpha_min=0.1) == AlphaChoice(1.0, 1.7, False)
    choice = select_alpha(low)
    assert choice.alpha == 0.0 and choice.raw == pytest.approx(-0.3) and not choice.fallback
    assert select_alpha(low, alpha_min=0.1).alpha == 0.1
    assert select_alpha(AlphaTerms(0.05, 0.0, 1.0), alpha_min=0.1).alpha == 0.1
    assert select_alpha(AlphaTerms(0.4, 0.0, 1.0)).alpha == 0.4
    assert select_alpha(high, clip=False).alpha == 1.7
    assert select_alpha(low, clip=False).alpha == pytest.approx(-0.3)


def test_update_accumulators_is_pure_and_checks_alpha():
    delta, fisher, S, G = _state()
    before = [{k: v.clone() for k, v in d.items()} for d in (delta, fisher, S, G)]
    new_S, new_G = update_accumulators(delta, fisher, S, G, 0.3)
    for d, b in zip((delta, fisher, S, G), before):
        assert all(torch.equal(d[k], b[k]) for k in SHAPES)
    assert all(not torch.equal(new_G[k], G[k]) for k in SHAPES)
    # Per-key alpha equals the scalar form key by key; outputs follow the dtype of S and G (fp32 buffers).
    per_key = update_accumulators(delta, fisher, S, G, {k: 0.3 for k in SHAPES})
    assert all(torch.equal(per_key[1][k], new_G[k]) for k in SHAPES)
    S32, G32 = ({k: v.float() for k, v in d.items()} for d in (S, G))
    assert all(v.dtype == torch.float32 for v in update_accumulators(delta, fisher, S32, G32, 0.3)[1].values())
    for bad in (math.nan, math.inf, {**{k: 0.5 for k in SHAPES}, "enc.q.bias": math.nan}):
        with pytest.raises(ValueError, match="alpha"):
            update_accumulators(delta, fisher, S, G, bad)
    # key by key (as the closed form replaces S and G): a bad alpha on the last key stops it before the first is given
    last_bad = {**{k: 0.5 for k in SHAPES}, list(SHAPES)[-1]: math.inf}
    with pytest.raises(ValueError, match="alpha"):
        next(accumulator_updates(delta, fisher, S, G, last_bad))
    assert [k for k, _, _ in accumulator_updates(delta, fisher, S, G, 0.3)] == list(SHAPES)


def test_per_parameter_alpha_accumulators_match_the_direct_sum():
    """G = sum_{i<t} F_i (theta_hat_{t-1} - theta*_i) stays exact when alpha is a tensor (CoFiMA), by brute force."""
    from pm_hf.method.merge import cofima_weights

    gen = torch.Generator().manual_seed(5)
    theta = torch.zeros(7, dtype=torch.float64)
    S, G = {"w": torch.zeros(7, dtype=torch.float64)}, {"w": torch.zeros(7, dtype=torch.float64)}
    optima, fishers = [], []
    for _ in range(4):
        star = theta + torch.randn(7, generator=gen, dtype=torch.float64)
        fisher = torch.rand(7, generator=gen, dtype=torch.float64)
        delta = {"w": star - theta}
        w = cofima_weights(fisher, S["w"], 0.4).double()
        S, G = update_accumulators(delta, {"w": fisher}, S, G, {"w": w})
        theta = theta + w * delta["w"]
        optima.append(star)
        fishers.append(fisher)
        direct = sum(f * (theta - s) for f, s in zip(fishers, optima))
        assert torch.allclose(G["w"], direct, rtol=1e-10, atol=1e-12)
        assert torch.allclose(S["w"], sum(fishers), rtol=1e-12)


def test_cofima_weights_by_hand():
    from pm_hf.method.merge import cofima_weights

    F = torch.tensor([1.0, 0.0, 3.0, 0.0])
    S = torch.tensor([1.0, 2.0, 0.0, 0.0])
    # a=0.5: w = F / (S + F); F=S=0 -> a
    assert torch.allclose(cofima_weights(F, S, 0.5), torch.tensor([0.5, 0.0, 1.0, 0.5]))
    # a=0.25: w = 0.25 F / (0.75 S + 0.25 F): first entry 0.25 / (0.75 + 0.25) = 0.25
    assert torch.allclose(cofima_weights(F, S, 0.25), torch.tensor([0.25, 0.0, 1.0, 0.25]))


def test_ties_trim_and_merge_by_hand():
    from pm_hf.method.merge import ties_merge, ties_trim

    tau = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2])
    assert torch.equal(ties_trim(tau, 0.4), torch.tensor([0.0, -3.0, 2.0, 0.0, 0.0]))
    assert torch.equal(ties_trim(tau, 1.0), tau)
    assert ties_trim(tau, 0.01).count_nonzero() == 1  # at least one entry survives
    a = torch.tensor([1.0, -2.0, 0.0, 4.0])
    b = torch.tensor([3.0, 1.0, -1.0, -1.0])
    # signs of the sum: +, -, -, +; agreeing entries averaged: [2, -2, -1, 4]
    assert torch.equal(ties_merge([a, b]), torch.tensor([2.0, -2.0, -1.0, 4.0]))


def test_magmax_update_by_hand():
    from pm_hf.method.merge import magmax_update

    a = torch.tensor([1.0, -2.0, 0.5])
    b = torch.tensor([-3.0, 1.0, 0.5])
    assert torch.equal(magmax_update(magmax_update(None, a), b), torch.tensor([-3.0, -2.0, 0.5]))


def test_the_sums_and_the_in_place_update_are_the_bits_of_the_plain_expressions():
    """`alpha_terms_by_key` converts every key into the same float64 buffers, and the strategy updates S and G where
    they are: both give the exact bits of the direct expressions (fresh tensors, `torch.dot`), over fp32 keys that
    grow and shrink and a transposed (non-contiguous) delta, with one alpha and with per-parameter alphas."""
    from pm_hf.method.merge import alpha_terms_by_key

    gen = torch.Generator().manual_seed(3)
    shapes = {"a": (5, 7), "b": (40, 30), "c": (3,), "d": (50, 41)}
    rand = lambda positive=False: {  # noqa: E731
        k: torch.randn(s, generator=gen).abs() if positive else torch.randn(s, generator=gen) for k, s in shapes.items()
    }
    deltas, fisher, S, G = rand(), rand(True), rand(True), rand()
    deltas["b"] = torch.randn(30, 40, generator=gen).T
    assert not deltas["b"].is_contiguous()
    dot = lambda t, y: float(torch.dot(t.reshape(-1).double(), y))  # noqa: E731
    for key, terms in alpha_terms_by_key(deltas, fisher, S, G).items():
        d = deltas[key].reshape(-1).double()
        d2 = d * d
        assert terms.fisher_delta_sq == dot(fisher[key], d2) and terms.g_delta == dot(G[key], d)
        assert terms.denominator == dot(S[key], d2) + dot(fisher[key], d2)
    for alpha in (0.3, {k: torch.rand(s, generator=gen) for k, s in shapes.items()}):
        expected_S, expected_G = update_accumulators(deltas, fisher, S, G, alpha)
        S2, G2 = ({k: v.clone() for k, v in acc.items()} for acc in (S, G))
        for key, s, g in accumulator_updates(deltas, fisher, S2, G2, alpha, in_place=True):
            assert s is S2[key] and g is G2[key]  # updated where they are
            assert torch.equal(s, expected_S[key]) and torch.equal(g, expected_G[key]), key
    # float64 storage is not what the fp32 buffers hold: new tensors, the inputs untouched, the same bits
    S64, G64 = ({k: v.double() for k, v in acc.items()} for acc in (S, G))
    before = {k: v.clone() for k, v in G64.items()}
    expected_S, expected_G = update_accumulators(deltas, fisher, S64, G64, 0.3)
    for key, s, g in accumulator_updates(deltas, fisher, S64, G64, 0.3, in_place=True):
        assert g is not G64[key] and torch.equal(G64[key], before[key])
        assert s.dtype == g.dtype == torch.float64 and torch.equal(g, expected_G[key])
