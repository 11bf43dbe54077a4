"""The merge's checks done once (pm_hf.method.merge, pm_hf.method.weights): the closed form's sums per key add up to
the whole, a NaN or inf in any of its four inputs is still refused by name, and a merged value that would overflow
is refused before anything is written."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from pm_hf.config.checks import NonFiniteError
from pm_hf.config.groups import LoraArguments
from pm_hf.method.adapters import attach_lora, lora_layers
from pm_hf.method.merge import alpha_terms, alpha_terms_by_key, sum_terms, update_accumulators
from pm_hf.method.weights import ModelWeights

SHAPES = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 2)}


def _dicts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda: {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}  # noqa: E731
    return rand(), {k: v.abs() for k, v in rand().items()}, {k: v.abs() for k, v in rand().items()}, rand()


def test_terms_by_key_add_up_and_match_a_float64_reference():
    deltas, fisher, S, G = _dicts()
    by_key = alpha_terms_by_key(deltas, fisher, S, G)
    assert sum_terms(by_key.values()) == alpha_terms(deltas, fisher, S, G)
    d = {k: v.double() for k, v in deltas.items()}
    ref = sum(float((fisher[k].double() * d[k] ** 2).sum()) for k in SHAPES)
    assert by_key["a.weight"].fisher_delta_sq + by_key["a.bias"].fisher_delta_sq + by_key[
        "b.weight"
    ].fisher_delta_sq == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", range(4))
def test_a_non_finite_input_is_refused_by_name(which, bad):
    dicts = list(_dicts())
    names = ("deltas", "fisher", "S", "G")
    dicts[which] = {k: v.clone() for k, v in dicts[which].items()}
    dicts[which]["b.weight"][1, 0] = bad
    if which != 0:  # where the delta is 0 (0 * inf is NaN: still caught)
        dicts[0] = {k: v.clone() for k, v in dicts[0].items()}
        dicts[0]["b.weight"][1, 0] = 0.0
    with pytest.raises(ValueError, match=rf"`{names[which]}\['b.weight'\]`"):
        alpha_terms_by_key(*dicts)
    with pytest.raises(ValueError, match="NaN or inf"):
        update_accumulators(*dicts, 0.5)
    update_accumulators(*dicts, 0.5, checked=True)  # told they were checked: no second pass


def test_a_merged_value_that_overflows_is_refused_before_any_write():
    model = attach_lora(tiny_bert(), LoraArguments(r=4), trainable_modules=["classifier"])
    first, second = sorted(lora_layers(model))[:2]
    weights = ModelWeights(model)
    targets = weights.targets([first, second])
    before = {k: t.detach().clone() for k, t in targets.items()}
    huge = torch.full_like(before[second], 3e38)
    for deltas, alpha in [
        ({first: torch.ones_like(before[first]), second: huge}, 2.0),  # finite inputs, the sum overflows
        ({first: torch.ones_like(before[first]), second: huge.clone().fill_(float("nan"))}, 1.0),
    ]:
        with pytest.raises(NonFiniteError, match=repr(second)):
            weights.apply(deltas, dict.fromkeys(deltas, alpha))
        assert all(torch.equal(t, before[k]) for k, t in targets.items())
    weights.apply({first: torch.ones_like(before[first])}, {first: 0.5})
    assert torch.equal(targets[first], before[first] + 0.5)
