"""Merge strategies (`pm_hf.method.strategies`) by hand on small tensors: what each merges, where each starts, what it
keeps
(`state_dict` round trips give the same next merge), its knobs' checks, and `merge_task` on a real LoRA model."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora, tiny_bert

from pm_hf.config.groups import LoraArguments, MergeArguments
from pm_hf.method.adapters import attach_lora, base_weights, lora_layers, lora_task_vector
from pm_hf.method.merge import LoraFactors, TaskVector, closed_form_alpha, cofima_weights, update_accumulators
from pm_hf.method.strategies import (
    STRATEGIES,
    MergeContext,
    MergeStrategy,
    build_strategy,
    check_merge_args,
    get_strategy,
    merge_task,
)
from pm_hf.method.strategies.base import alpha_plan, constant, register
from pm_hf.method.weights import ModelWeights

D = torch.float64


def vector(lora: dict, trained: dict | None = None) -> TaskVector:
    factors = {k: LoraFactors(torch.ones(1, 1), torch.ones(1, 1), 1.0) for k in lora}
    return TaskVector(dict(lora), {}, dict(trained or {}), factors)


def strategy(name: str, **knobs) -> MergeStrategy:
    return build_strategy(MergeArguments(merge_method=name, **knobs))


def test_registry_names_and_errors():
    assert {"pm", "seq", "seq-merge", "average", "coma", "cofima", "task-arithmetic", "ties", "magmax",
            "oracle-alpha", "joint"} <= set(STRATEGIES)  # fmt: skip
    assert get_strategy("pm").needs_fisher and not get_strategy("coma").needs_fisher
    with pytest.raises(ValueError, match=r"merge_method = 'nope': use one of .*'coma'.*'pm'"):
        get_strategy("nope")
    with pytest.raises(ValueError, match="same rule as 'coma'.*fixed_alpha"):
        get_strategy("fixed")
    with pytest.raises(ValueError, match="unique"):

        @register
        class Dup(MergeStrategy):
            name = "pm"


@pytest.mark.parametrize(
    "knob, value",
    [("fixed_alpha", 1.5), ("cofima_weight", -0.1), ("merge_scale", float("nan")), ("ties_density", 0.0),
     ("alpha_min", 2), ("alpha_granularity", "layer"), ("oracle_grid", []), ("oracle_grid", [0.5, 1.5]),
     ("alpha_clip", "yes")],
)  # fmt: skip
def test_every_knob_is_checked_whatever_the_strategy(knob, value):
    """Each knob is checked by the strategy that owns it, also when another strategy is chosen (nothing unused
    slips through)."""
    with pytest.raises(ValueError, match=f"^{knob} = "):
        check_merge_args(MergeArguments(merge_method="seq-merge", **{knob: value}))


def test_closed_form_global_and_per_module_and_its_state():
    gen = torch.Generator().manual_seed(0)
    shapes = {"enc.q.weight": (4, 3), "enc.q.bias": (4,), "enc.v.weight": (2, 5)}
    rand = lambda: {k: torch.randn(s, generator=gen, dtype=D) for k, s in shapes.items()}  # noqa: E731
    pos = lambda: {k: torch.rand(s, generator=gen, dtype=D) + 0.1 for k, s in shapes.items()}  # noqa: E731
    first, fisher1, second, fisher2 = rand(), pos(), rand(), pos()
    pm = strategy("pm", alpha_clip=False)
    plan = pm.merge(MergeContext(0, vector(first), fisher=fisher1))
    assert plan.choice.alpha == 1.0 and plan.origin == "previous" and plan.low_rank
    S, G = {k: v.clone() for k, v in pm.S.items()}, {k: v.clone() for k, v in pm.G.items()}
    plan = pm.merge(MergeContext(1, vector(second), fisher=fisher2))
    assert plan.choice.raw == pytest.approx(closed_form_alpha(second, fisher2, S, G), rel=1e-12)
    assert set(plan.alpha.values()) == {plan.choice.alpha} and not plan.per_key
    # S and G, replaced key by key in the strategy, are the pure update's on the same inputs, bit for bit
    expected = update_accumulators(second, fisher2, S, G, plan.choice.alpha)
    assert all(torch.equal(pm.S[k], expected[0][k]) and torch.equal(pm.G[k], expected[1][k]) for k in shapes)
    # one alpha per module (key minus its last component): enc.q's two keys share one, enc.v has its own
    per_module = strategy("pm", alpha_clip=False, alpha_granularity="module")
    per_module.load_state_dict({**{f"S/{k}": v for k, v in S.items()}, **{f"G/{k}": v for k, v in G.items()}})
    plan = per_module.merge(MergeContext(1, vector(second), fisher=fisher2))
    q = ["enc.q.weight", "enc.q.bias"]
    sub = lambda keys: [{k: d[k] for k in keys} for d in (second, fisher2, S, G)]  # noqa: E731
    assert plan.alpha["enc.q.bias"] == plan.alpha["enc.q.weight"] == closed_form_alpha(*sub(q))
    assert plan.alpha["enc.v.weight"] == closed_form_alpha(*sub(["enc.v.weight"])) and plan.per_key
    with pytest.raises(ValueError, match="Fisher"):
        strategy("pm").merge(MergeContext(0, vector(first)))


def test_schedules_by_hand():
    deltas = {"w": torch.ones(2, 2)}
    alphas = lambda name, t, **kw: set(strategy(name, **kw).merge(MergeContext(t, vector(deltas))).alpha.values())  # noqa: E731
    assert alphas("seq-merge", 3) == {1.0} and alphas("joint", 0) == {1.0}
    assert alphas("average", 0) == {1.0} and alphas("average", 3) == {0.25}
    assert alphas("coma", 2, fixed_alpha=0.3) == {0.3}
    # averaging with alpha_t = 1/t gives the mean of the task optima
    theta, optima = torch.zeros(3), [torch.tensor([1.0, 2, 3]), torch.tensor([4.0, 0, 1]), torch.tensor([0.0, 5, 2])]
    for t, opt in enumerate(optima):
        (a,) = alphas("average", t)
        theta = theta + a * (opt - theta)
    torch.testing.assert_close(theta, torch.stack(optima).mean(0))


def test_cofima_by_hand_and_its_state():
    F, S = torch.tensor([1.0, 0.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, 0.0, 0.0])
    cofima = strategy("cofima", cofima_weight=0.5)
    cofima.load_state_dict({"S/w": S})
    plan = cofima.merge(MergeContext(1, vector({"w": torch.tensor([1.0, 1.0, 0.0, 0.0])}), fisher={"w": F}))
    assert plan.choice.alpha == pytest.approx(0.25)  # sum w d^2 / sum d^2 = (0.5 + 0) / 2
    assert torch.equal(plan.alpha["w"], cofima_weights(F, S, 0.5)) and not plan.low_rank
    assert torch.equal(cofima.state_dict()["S/w"], S + F)


def test_oracle_takes_the_first_best_grid_point():
    oracle = strategy("oracle-alpha", oracle_grid=[0.0, 0.5, 1.0])
    scores = {0.0: 0.2, 0.5: 0.7, 1.0: 0.7}
    plan = oracle.merge(MergeContext(1, vector({"w": torch.ones(2)}), score=scores.__getitem__))
    assert plan.choice.alpha == 0.5 and plan.oracle_scores == {"0.0": 0.2, "0.5": 0.7, "1.0": 0.7}
    first = oracle.merge(MergeContext(0, vector({"w": torch.ones(2)}), score=lambda a: 1 / 0))
    assert first.choice.alpha == 1.0  # task 1: nothing to trade off, not scored
    half = strategy("oracle-alpha", merge_parameters={"oracle_first_alpha": 0.5})  # a rule's first merge, to bound
    assert half.merge(MergeContext(0, vector({"w": torch.ones(2)}), score=lambda a: 1 / 0)).choice.alpha == 0.5
    with pytest.raises(ValueError, match="^oracle_first_alpha = 2: "):
        strategy("oracle-alpha", merge_parameters={"oracle_first_alpha": 2})


def test_task_vector_strategies_by_hand():
    theta0 = {"w": torch.zeros(3), "pooler": torch.tensor([1.0, 1.0])}
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-3.0, 1.0, 0.5])
    pa, pb = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])  # trained pooler values: tau = trained - theta_0
    runs = {}
    for name, knobs in {"task-arithmetic": {"merge_scale": 0.5}, "magmax": {"merge_scale": 1.0},
                        "ties": {"merge_scale": 0.5, "ties_density": 1.0}, "seq": {}}.items():  # fmt: skip
        s = strategy(name, **knobs)
        s.pretrained = theta0
        plans = [
            s.merge(MergeContext(t, vector({"w": x}, {"pooler": p}))) for t, (x, p) in enumerate(((a, pa), (b, pb)))
        ]
        assert all(plan.origin == "pretrained" and not plan.low_rank for plan in plans)
        runs[name] = plans[-1].deltas
    torch.testing.assert_close(runs["task-arithmetic"]["w"], 0.5 * (a + b))
    torch.testing.assert_close(runs["task-arithmetic"]["pooler"], 0.5 * (pa - 1 + pb - 1))
    torch.testing.assert_close(runs["magmax"]["w"], torch.tensor([-3.0, -2.0, 0.5]))
    torch.testing.assert_close(runs["ties"]["w"], 0.5 * torch.tensor([-3.0, -2.0, 0.5]))  # signs disagree: one wins
    torch.testing.assert_close(runs["seq"]["w"], b)  # seq: the last fine-tuned model itself
    assert [get_strategy(n).start for n in ("seq", "magmax", "task-arithmetic", "ties", "pm")] == [
        "chain", "chain", "pretrained", "pretrained", "merged"]  # fmt: skip
    with pytest.raises(ValueError, match="pretrained"):
        strategy("ties").merge(MergeContext(0, vector({"w": a})))


@pytest.mark.parametrize("name", ["pm", "cofima", "task-arithmetic", "ties", "magmax", "seq"])
def test_state_dict_round_trip_gives_the_same_next_merge(name):
    gen = torch.Generator().manual_seed(1)
    tasks = [({"w": torch.randn(3, 2, generator=gen)}, {"w": torch.rand(3, 2, generator=gen) + 0.1}) for _ in range(3)]
    fresh = lambda: strategy(name)  # noqa: E731
    a, b = fresh(), fresh()
    for s in (a, b):
        s.pretrained = {"w": torch.zeros(3, 2)}
    for t, (delta, fisher) in enumerate(tasks[:2]):
        a.merge(MergeContext(t, vector(delta), fisher=fisher))
    b.load_state_dict(a.state_dict())
    if name in ("seq", "magmax"):  # chain strategies continue from the stored adapter and weights
        assert b.start_point(2).adapter is not None
    delta, fisher = tasks[2]
    plan_a, plan_b = (
        a.merge(MergeContext(2, vector(delta), fisher=fisher)),
        b.merge(MergeContext(2, vector(delta), fisher=fisher)),
    )
    assert (plan_a.choice.alpha, plan_a.choice.raw) == (plan_b.choice.alpha, plan_b.choice.raw)
    assert all(torch.equal(torch.as_tensor(plan_a.alpha[k]), torch.as_tensor(plan_b.alpha[k])) for k in plan_a.alpha)
    assert all(torch.equal(plan_a.deltas[k], plan_b.deltas[k]) for k in plan_a.deltas)


def test_merge_task_writes_theta_hat_and_zeroes_the_adapter():
    model = attach_lora(tiny_bert(), LoraArguments(r=4))
    randomize_lora(model, seed=2)
    weights = ModelWeights(model)
    start = {k: w.detach().clone() for k, w in base_weights(model).items()}
    deltas = lora_task_vector(model)
    plan = merge_task(weights, strategy("coma", fixed_alpha=0.25), 1, weights.task_vector({}))
    assert plan.choice.alpha == 0.25
    for key, w in base_weights(model).items():
        torch.testing.assert_close(w, start[key] + 0.25 * deltas[key])
    assert all(not layer.lora_B["default"].weight.any() for layer in lora_layers(model).values())


def test_a_new_calibration_or_strategy_is_one_class_with_its_own_knobs():
    """A calibration (and a strategy) registered with a knob of its own is chosen by name and reads its knob from
    `merge_parameters`, checked by its declaration; `MergeArguments` is not edited."""
    from pm_hf.config.checks import check_number
    from pm_hf.method.strategies.calibration import CALIBRATIONS, Calibration, register_calibration
    from pm_hf.method.strategies.knobs import DECLARED, Knob

    positive = lambda name, value: check_number(name, value, 0, low_open=True)  # noqa: E731

    @register_calibration
    class Scaled(Calibration):  # kappa_t = a constant knob, no measurement
        name = "test-scaled"
        knobs = (Knob("calibration_scale", 1.0, positive),)
        needs_probe = False

        def calibrate(self, context, deltas, fisher):
            return {k: v * self.calibration_scale for k, v in fisher.items()}, {"kappa": self.calibration_scale}

    @register
    class Halfway(MergeStrategy):  # alpha = a constant knob
        name = "test-halfway"
        knobs = (Knob("halfway_alpha", 0.5, lambda n, v: check_number(n, v, 0, 1)),)

        def merge(self, context):
            return alpha_plan(context.vector, constant(context.vector.deltas, self.halfway_alpha))

    try:
        gen = torch.Generator().manual_seed(4)
        deltas = [{"w": torch.randn(3, 2, generator=gen, dtype=D)} for _ in range(2)]
        fishers = [{"w": torch.rand(3, 2, generator=gen, dtype=D) + 0.1} for _ in range(2)]
        scaled = strategy(
            "pm", alpha_clip=False, alpha_calibration="test-scaled", merge_parameters={"calibration_scale": 4.0}
        )
        plain = strategy("pm", alpha_clip=False)
        assert isinstance(scaled.calibration, Scaled) and scaled.calibration.calibration_scale == 4.0
        for t in range(2):
            got = scaled.merge(MergeContext(t, vector(deltas[t]), fisher=fishers[t]))
            want = plain.merge(MergeContext(t, vector(deltas[t]), fisher={"w": 4.0 * fishers[t]["w"]}))
            assert got.choice.raw == want.choice.raw and got.calibration == {"kappa": 4.0}
        assert strategy("pm", alpha_calibration="test-scaled").calibration.calibration_scale == 1.0  # its default
        plan = strategy("test-halfway", merge_parameters={"halfway_alpha": 0.25}).merge(
            MergeContext(1, vector(deltas[0]))
        )
        assert plan.choice.alpha == 0.25
        with pytest.raises(ValueError, match="^calibration_scale = -1"):
            check_merge_args(MergeArguments(merge_parameters={"calibration_scale": -1}))
        with pytest.raises(ValueError, match="^merge_parameters = .*'nope' is no knob"):
            check_merge_args(MergeArguments(merge_parameters={"nope": 1}))
        with pytest.raises(ValueError, match="^merge_parameters = .*set `fixed_alpha` directly"):
            check_merge_args(MergeArguments(merge_parameters={"fixed_alpha": 0.3}))
    finally:  # the registries as they were
        CALIBRATIONS.pop("test-scaled")
        STRATEGIES.pop("test-halfway")
        DECLARED.pop("calibration_scale")
        DECLARED.pop("halfway_alpha")


def test_the_context_makes_only_what_a_strategy_asks_for_and_once():
    made = []
    make = lambda name, value: lambda: made.append(name) or value  # noqa: E731
    context = MergeContext.on_demand(1, vector({"w": torch.ones(2)}), fisher=make("fisher", {"w": torch.ones(2)}),
                                     score=make("score", lambda a: a), probe=make("probe", None))  # fmt: skip
    strategy("coma").merge(context)
    assert made == [] and context.made("fisher") is None  # a schedule asks for nothing
    for _ in range(2):
        assert strategy("oracle-alpha", oracle_grid=[0.0, 1.0]).merge(context).choice.alpha == 1.0
    assert made == ["score"]  # made once, on the first request


def test_callbacks_trial_enters_every_callback_and_leaves_in_reverse():
    import contextlib

    from pm_hf.method.callbacks import CallbackList, ContinualCallback

    events = []

    class Trial(ContinualCallback):
        def __init__(self, n):
            self.n = n

        @contextlib.contextmanager
        def trial(self, t, model, task):
            events.append(("in", self.n))
            yield
            events.append(("out", self.n))

    with CallbackList([Trial(1), ContinualCallback(), Trial(2)]).trial(0, None, None):
        events.append("score")
    assert events == [("in", 1), ("in", 2), "score", ("out", 2), ("out", 1)]
