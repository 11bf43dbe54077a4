"""The calibrated closed forms of docs/method.md (`alpha_calibration`), the baselines the alpha-collapse diagnosis
calls for, and what is logged per task: each formula against a hand example or brute force, the strategy against the
direct formula over stored task optima and calibrated Fishers, and the loop's probes end to end."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import groups, tiny_bert

from pm_hf.config.checks import NonFiniteError
from pm_hf.config.groups import FisherArguments, LoraArguments, MergeArguments, RunConfig
from pm_hf.continual import build_loop, run_continual
from pm_hf.method.adapters import attach_lora, lora_layers, scale_active_adapter
from pm_hf.method.fisher import estimate_fisher
from pm_hf.method.merge import LoraFactors, TaskVector, branch_secant, curve_alpha, secant_kappa
from pm_hf.method.strategies import MergeContext, build_strategy
from pm_hf.method.strategies.base import TaskProbe

D = torch.float64
SHAPES = {"a.weight": (3, 4), "b.weight": (2, 2)}


def test_secant_kappa_by_hand():
    assert secant_kappa(2.0, 0.5) == 4.0  # <kappa F, Delta^2> = 2 dL: the quadratic passes through L(0)
    assert secant_kappa(0.0, 0.5) == 0.0 and secant_kappa(-1.0, 0.5) == 0.0  # nothing lost by not moving
    assert secant_kappa(1.0, 0.0) == 0.0  # no curvature along Delta
    with pytest.raises(NonFiniteError):
        secant_kappa(math.nan, 1.0)


def test_branch_secant_by_hand():
    assert branch_secant(0.3, 0.1, 0.5) == pytest.approx(2 * 0.2 / 0.25)
    assert branch_secant(None, 0.1, 0.5) is None and branch_secant(0.1, 0.3, 0.5) is None  # c_t <= 0: unusable


def test_curve_alpha_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    grid = [i / 10 for i in range(11)]
    for _ in range(20):
        losses = (torch.rand(11, generator=gen) * 2).tolist()
        g, s = float(torch.randn(1, generator=gen)), float(torch.rand(1, generator=gen))
        alpha, objective = curve_alpha(grid, losses, g, s)
        brute = [losses[i] - losses[-1] + a * g + 0.5 * a * a * s for i, a in enumerate(grid)]
        assert objective == pytest.approx(brute)
        assert alpha == grid[min(range(11), key=lambda i: (brute[i], -grid[i]))]
    assert curve_alpha([0.0, 0.5, 1.0], [1.0, 0.0, 0.0], 0.0, 0.0)[0] == 1.0  # a tie goes to the larger alpha
    with pytest.raises(ValueError, match="must contain alpha = 1"):
        curve_alpha([0.0, 0.5], [1.0, 0.5], 0.0, 0.0)


def _task(gen) -> tuple[dict, dict]:
    delta = {k: torch.randn(s, generator=gen, dtype=D) for k, s in SHAPES.items()}
    fisher = {k: torch.rand(s, generator=gen, dtype=D) + 0.1 for k, s in SHAPES.items()}
    return delta, fisher


def _vector(delta: dict) -> TaskVector:
    return TaskVector(dict(delta), {}, {}, {k: LoraFactors(torch.zeros(1, 1), torch.zeros(1, 1), 1.0) for k in delta})


def test_secant_calibrated_alpha_equals_the_direct_formula_over_calibrated_fishers():
    """alpha_t = -sum_i <(theta_hat_{t-1} - theta*_i) kappa_i F_i, Delta> / sum_i <kappa_i F_i, Delta^2> over stored
    optima, with kappa_i = 2 dL_i / <F_i, Delta_i^2>; and alpha_t = (2 dL - <G, Delta>) / (<S, Delta^2> + 2 dL)."""
    gen = torch.Generator().manual_seed(1)
    strategy = build_strategy(MergeArguments(merge_method="pm", alpha_calibration="secant", alpha_clip=False))
    theta = {k: torch.zeros(s, dtype=D) for k, s in SHAPES.items()}
    optima, calibrated = [], []
    for t, dl in enumerate((0.8, 0.3, 1.5, 0.05)):
        delta, fisher = _task(gen)
        probe = TaskProbe(loss=lambda a, dl=dl: dl * (1 - a) ** 2 + 0.1)  # L(0) - L(1) = dl
        star = {k: theta[k] + delta[k] for k in delta}
        kappa = 2 * dl / sum(float((fisher[k] * delta[k] ** 2).sum()) for k in delta)
        optima.append(star)
        calibrated.append({k: kappa * f for k, f in fisher.items()})
        num = -sum(float(((theta[k] - o[k]) * f[k] * delta[k]).sum()) for o, f in zip(optima, calibrated) for k in o)
        den = sum(float((f[k] * delta[k] ** 2).sum()) for f in calibrated for k in f)
        S = [sum(f[k] for f in calibrated[:-1]) if t else 0 for k in SHAPES]
        plan = strategy.merge(MergeContext(t, _vector(delta), fisher=fisher, probe=probe))
        assert plan.choice.raw == pytest.approx(num / den, rel=1e-6)  # S, G in fp32
        assert plan.calibration["kappa"] == pytest.approx(kappa) and plan.calibration["target"] == pytest.approx(2 * dl)
        if t:
            s_d2 = sum(float((S[i] * delta[k] ** 2).sum()) for i, k in enumerate(SHAPES))
            g_d = plan.terms.g_delta
            assert plan.choice.raw == pytest.approx((2 * dl - g_d) / (s_d2 + 2 * dl), rel=1e-6)
        theta = {k: theta[k] + plan.choice.raw * delta[k] for k in delta}


def test_curve_picks_the_minimum_of_the_measured_loss_for_a_first_task():
    strategy = build_strategy(MergeArguments(merge_method="pm", alpha_calibration="curve"))
    delta, fisher = _task(torch.Generator().manual_seed(2))
    probe = TaskProbe(heldout_loss=lambda a: (a - 0.7) ** 2 + 1.0)
    plan = strategy.merge(MergeContext(0, _vector(delta), fisher=fisher, probe=probe))
    assert plan.choice.alpha == pytest.approx(0.7)  # S = G = 0: the new task's own curve decides
    assert plan.calibration["kappa"] == pytest.approx(2 * (0.49 - 0.09) / plan.calibration["fisher_delta_sq"])


def test_branch_calibration_uses_the_branch_secant_else_falls_back():
    strategy = build_strategy(MergeArguments(merge_method="pm", alpha_calibration="branch"))
    delta, fisher = _task(torch.Generator().manual_seed(3))
    probe = TaskProbe(loss=lambda a: 1.0 - 0.5 * a, branch_losses={-1: 0.3, 0: 0.1, 1: 0.2}, eps=0.5)
    assert strategy.merge(MergeContext(0, _vector(delta), fisher=fisher, probe=probe)).calibration[
        "target"
    ] == pytest.approx(1.6)
    probe.branch_losses = {-1: None, 0: 0.1, 1: None}
    plan = strategy.merge(MergeContext(1, _vector(delta), fisher=fisher, probe=probe))
    assert plan.calibration["target"] == pytest.approx(1.0) and plan.calibration["loss_at_0"] == 1.0


def test_a_perturbed_fisher_is_the_fisher_of_the_adapter_at_1_minus_eps():
    from datasets import Dataset

    torch.manual_seed(0)
    model = attach_lora(tiny_bert(num_labels=2), LoraArguments(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_()
    data = Dataset.from_dict({"input_ids": torch.randint(0, 64, (8, 6)).tolist(), "labels": [0, 1] * 4})
    collate = lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    with scale_active_adapter(model, 0.5):
        perturbed = estimate_fisher(model, data, collate, FisherArguments())
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.mul_(0.5)
    halved = estimate_fisher(model, data, collate, FisherArguments())
    for key in perturbed:
        torch.testing.assert_close(perturbed[key], halved[key], rtol=1e-5, atol=1e-9)


def test_sqrt_t_merges_with_one_over_root_t(model_dir, tmp_path):
    results = run_continual(*groups(model_dir, tmp_path, merge_method="sqrt-t"))
    assert results["alphas"] == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)])


# secant in the default tier; branch and curve (opt-in forms, the same logging path) in the slow tier
SLOW_FORMS = [pytest.param(form, marks=pytest.mark.slow) for form in ("branch", "curve")]


@pytest.mark.parametrize("calibration", ["secant", *SLOW_FORMS])
def test_calibrated_runs_log_what_they_measured(model_dir, tmp_path, calibration):
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path, alpha_calibration=calibration, log_loss_increase=True)))
    sizes = [len(task.train) for task in loop.stream.tasks]
    results = loop.run()
    for t, cal in enumerate(results["calibrations"]):
        assert cal["method"] == calibration and cal["kappa"] >= 0 and results["fisher_traces"][t] > 0
        assert cal["kappa"] == pytest.approx(max(cal["target"], 0) / cal["fisher_delta_sq"])
        if "loss_at_0" in cal:
            assert cal["target"] == pytest.approx(2 * (cal["loss_at_0"] - cal["loss_at_1"]))
        increase = results["loss_increases"][t]
        assert increase["alpha"] == results["alphas"][t] and math.isfinite(increase["measured"])
        expected = 0.5 * (1 - increase["alpha"]) ** 2 * max(cal["target"], 0.0)  # a negative target: kappa = 0
        assert increase["predicted_calibrated"] == pytest.approx(expected)
    if calibration == "curve":  # a tenth of each task's training data held out, never trained on
        for task, size in zip(loop.stream.tasks, sizes):
            assert len(task.heldout) == math.ceil(0.1 * size) and len(task.train) + len(task.heldout) == size


def test_the_oracle_with_head_alignment_leaves_the_head_as_it_found_it(model_dir, tmp_path):
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path, merge_method="oracle-alpha", head_align="prototypes")))
    results = loop.run()
    scores = results["oracle_scores"]
    for t in range(1, 3):  # the chosen alpha's score is the best on the grid, measured with the head aligned
        assert scores[t][f"{results['alphas'][t]:.1f}"] == max(scores[t].values())
    aligner = next(cb for cb in loop.callbacks.callbacks if type(cb).__name__ == "HeadAlignment")
    before = loop.head.module.weight.detach().clone(), {k: v.clone() for k, v in aligner.stats.items()}
    with aligner.trial(2, loop.model, loop.stream.tasks[2]):
        assert not torch.equal(loop.head.module.weight, before[0])
    assert torch.equal(loop.head.module.weight, before[0])
    assert all(torch.equal(aligner.stats[k], v) for k, v in before[1].items())
