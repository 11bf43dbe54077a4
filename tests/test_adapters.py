"""Tests of `pm_hf.method.adapters`: LoRA task vectors in effective-weight space, merging through the fp32 master copy,
the per-task history, the temporary adapter rescale and the Gaussian-noise ablation (docs/method.md, "Which parameters,
which space"). LoRA factors are randomized with `randomize_lora`, so B != 0 and nothing passes by accident."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from peft import LoraConfig

from pm_hf.config.groups import LoraArguments
from pm_hf.hub.export import history_delta, task_record
from pm_hf.method.adapters import (
    active_adapter,
    adapter_factors,
    attach_lora,
    detect_target_modules,
    full_trainable_params,
    gaussian_adapter_noise,
    lora_delta,
    lora_layers,
    lora_task_vector,
    reset_adapter,
    scale_active_adapter,
    task_vector_norm,
)
from pm_hf.method.weights import ModelWeights

FAMILIES = {  # name: (factory, expected targets, input builder)
    "vit": (tiny_vit, ["q_proj", "v_proj"], lambda g: {"pixel_values": torch.randn(2, 1, 8, 8, generator=g)}),
    "bert": (tiny_bert, ["query", "value"], lambda g: {"input_ids": torch.randint(0, 64, (2, 6), generator=g)}),
    "llama": (tiny_llama, ["q_proj", "v_proj"], lambda g: {"input_ids": torch.randint(0, 64, (2, 6), generator=g)}),
    "gpt2": (tiny_gpt2, ["c_attn"], lambda g: {"input_ids": torch.randint(0, 64, (2, 6), generator=g)}),
}


def _inputs(family: str) -> dict[str, torch.Tensor]:
    return FAMILIES[family][2](torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def _wrapped(family: str, seed: int = 1, scale: float = 0.1, **lora_kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_lora(FAMILIES[family][0](), LoraArguments(r=4, **lora_kw))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # set right, not fixed up by PEFT
    randomize_lora(model, seed=seed, scale=scale)
    return model


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {k: layer.get_base_layer().weight.detach().clone() for k, layer in lora_layers(model).items()}


def _merge_active(model, factor: float = 1.0) -> None:
    """theta <- theta + factor * Delta of the active adapter, then a fresh adapter (B = 0)."""
    deltas = lora_task_vector(model)
    ModelWeights(model).apply(deltas, {k: factor for k in deltas})
    reset_adapter(model)


# 1. merge in effective-weight space reproduces the adapted model, for every family ------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_round_trip_matches_adapter_and_peft(family):
    factory, expected, _ = FAMILIES[family]
    assert detect_target_modules(factory()) == expected
    model = _wrapped(family, scale=0.3)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(expected)
    assert all(layer.fan_in_fan_out == (family == "gpt2") for layer in layers.values())
    inputs = _inputs(family)
    adapted = _logits(model, inputs)
    before = _base_weights(model)
    reference = copy.deepcopy(model).merge_and_unload()

    deltas = lora_task_vector(model)
    assert set(deltas) == set(layers)
    for key, delta in deltas.items():
        assert delta.shape == before[key].shape and delta.abs().max() > 1e-3
    ModelWeights(model).apply(deltas, {k: 1.0 for k in deltas})
    reset_adapter(model)
    assert all(float(layer.lora_B["default"].weight.detach().abs().max()) == 0.0 for layer in layers.values())
    merged = _logits(model, inputs)
    assert (merged - adapted).abs().max() < 1e-5
    assert (merged - _logits(reference, inputs)).abs().max() < 1e-5
    # the un-merged logits really differ (the adapter mattered)
    assert (adapted - _logits(_wrapped(family, scale=0.0), inputs)).abs().max() > 1e-3

    ref_params = dict(reference.named_parameters())
    for key, layer in layers.items():
        assert (layer.get_base_layer().weight - ref_params[key]).abs().max() < 1e-6, key


# 2. rsLoRA scaling --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_rslora_delta_uses_alpha_over_sqrt_r(family):
    model = _wrapped(family, lora_alpha=6.0, use_rslora=True)
    for layer in lora_layers(model).values():
        s = 6.0 / math.sqrt(4)
        assert layer.scaling["default"] == pytest.approx(s, rel=1e-12)
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        expected = s * B @ A
        expected = expected.T if family == "gpt2" else expected
        assert torch.allclose(lora_delta(layer, "default").double(), expected, atol=1e-6, rtol=0)
    plain = _wrapped("bert", lora_alpha=6.0)
    assert all(layer.scaling["default"] == pytest.approx(1.5) for layer in lora_layers(plain).values())


# 3. per-task history reproduces the merged base weights ------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_history_delta_equals_merged_minus_original(family):
    model = _wrapped(family)
    original = _base_weights(model)
    keys = sorted(lora_layers(model))
    alphas = [{k: 0.7 for k in keys}, {k: 0.1 + 0.2 * i for i, k in enumerate(keys)}, {k: 1.0 for k in keys}]
    merger, history = ModelWeights(model), []
    for task, alpha in enumerate(alphas):
        randomize_lora(model, seed=100 + task, scale=0.1)
        history.append(task_record(adapter_factors(model), alpha))
        merger.apply(lora_task_vector(model), alpha)
        reset_adapter(model)
    assert [rec.alpha for rec in history] == alphas
    assert all(rec.fan_in_fan_out == (family == "gpt2") for rec in history)
    total = history_delta(history)
    merged = _base_weights(model)
    assert set(total) == set(keys)
    for key in keys:
        assert total[key].shape == original[key].shape
        assert total[key].abs().max() > 1e-3
        assert (total[key] - (merged[key] - original[key])).abs().max() < 1e-6, key


# 4. bf16: the fp32 master copy avoids accumulating rounding --------------------------------------------------
def test_bf16_master_copy_is_exact_and_beats_naive_accumulation():
    model = _wrapped("bert")
    original = {k: v.double() for k, v in _base_weights(model).items()}  # true fp32 values before the cast
    model.to(torch.bfloat16)
    layers = lora_layers(model)
    g = torch.Generator().manual_seed(5)
    merger = ModelWeights(model)
    expected = dict(original)
    naive = {k: v.to(torch.bfloat16) for k, v in original.items()}
    for step in range(12):
        deltas = {k: torch.randn(v.shape, generator=g) * 1e-4 for k, v in original.items()}
        alpha = {k: 0.5 + 0.04 * step for k in deltas}
        merger.apply(deltas, alpha, base=original if step == 0 else None)
        for k, d in deltas.items():
            expected[k] = expected[k] + alpha[k] * d.double()
            naive[k] = naive[k] + (alpha[k] * d).to(torch.bfloat16)
    naive_err = cast_err = 0.0
    for key, layer in layers.items():
        master, weight = merger.master[key], layer.get_base_layer().weight
        assert master.dtype == torch.float32 and weight.dtype == torch.bfloat16
        assert (master.double() - expected[key]).abs().max() < 1e-6, key
        assert torch.equal(weight, master.to(torch.bfloat16))
        cast_err += float((weight.double() - expected[key]).abs().mean())
        naive_err += float((naive[key].double() - expected[key]).abs().mean())
    assert naive_err > 2 * cast_err, (naive_err, cast_err)


# 5. temporary rescale of the active adapter -------------------------------------------------------------------
def test_scale_active_adapter_scales_delta_and_restores_exactly():
    model = _wrapped("bert", scale=0.3)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=3, target_modules=["query", "value"]))
    assert active_adapter(model) == "default"
    layers = list(lora_layers(model).values())
    saved = [dict(layer.scaling) for layer in layers]
    inputs, factor = _inputs("bert"), 1.5
    reference = copy.deepcopy(model)
    _merge_active(reference, factor)
    with scale_active_adapter(model, factor):
        for layer, old in zip(layers, saved):
            assert layer.scaling["default"] == old["default"] * factor
            assert layer.scaling["other"] == old["other"]
        scaled = _logits(model, inputs)
    assert (scaled - _logits(reference, inputs)).abs().max() < 1e-5
    assert (scaled - _logits(model, inputs)).abs().max() > 1e-3
    assert [dict(layer.scaling) for layer in layers] == saved
    with pytest.raises(RuntimeError, match="boom"), scale_active_adapter(model, 0.5):
        raise RuntimeError("boom")
    assert [dict(layer.scaling) for layer in layers] == saved


# 6. task-vector norm via Gram matrices ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_task_vector_norm_matches_dense_frobenius(family):
    model = _wrapped(family, scale=0.3)
    dense = math.sqrt(
        sum(float(lora_delta(layer, "default").double().pow(2).sum()) for layer in lora_layers(model).values())
    )
    assert dense > 0
    assert task_vector_norm(model) == pytest.approx(dense, rel=1e-6)
    reset_adapter(model)
    assert task_vector_norm(model) == 0.0


# 7. Gaussian-noise ablation ------------------------------------------------------------------------------------
def _layer_outputs(layers) -> list[torch.Tensor]:
    """Each LoRA layer applied to the identity: row i is the layer's response to input e_i."""
    with torch.no_grad():
        return [layer(torch.eye(layer.lora_A["default"].weight.shape[1])) for layer in layers]


def test_gaussian_adapter_noise_scale_seed_and_cleanup():
    model = _wrapped("bert", scale=0.3)
    inputs, eps = _inputs("bert"), 0.5
    layers = list(lora_layers(model).values())
    clean_logits, clean_out = _logits(model, inputs), _layer_outputs(layers)
    ratios = []
    for seed in range(5):
        with gaussian_adapter_noise(model, eps, +1, seed):
            noisy_logits, noisy_out = _logits(model, inputs), _layer_outputs(layers)
            again = _logits(model, inputs)
        assert torch.equal(noisy_logits, again)
        assert (noisy_logits - clean_logits).abs().max() > 1e-4
        with gaussian_adapter_noise(model, eps, +1, seed):
            assert torch.equal(_logits(model, inputs), noisy_logits)  # same seed, same noise
        with gaussian_adapter_noise(model, eps, -1, seed):
            neg_out = _layer_outputs(layers)
        for layer, clean, noisy, neg in zip(layers, clean_out, noisy_out, neg_out):
            noise = noisy - clean  # = N^T
            assert torch.allclose(neg - clean, -noise, atol=1e-6)
            ratios.append(float(noise.norm()) / (eps * float(lora_delta(layer, "default").norm())))
    with gaussian_adapter_noise(model, eps, +1, 7):
        other_seed = _logits(model, inputs)
    assert (other_seed - noisy_logits).abs().max() > 1e-5
    assert all(not layer._forward_hooks for layer in layers)
    assert torch.equal(_logits(model, inputs), clean_logits)
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)
    assert all(0.7 < r < 1.3 for r in ratios)
    reset_adapter(model)  # Delta = 0: no noise at all
    with gaussian_adapter_noise(model, eps, +1, 0):
        assert all(not layer._forward_hooks for layer in layers)


# 8. trainable modules and input validation --------------------------------------------------------------------
def test_trainable_modules_and_unknown_module_name():
    model = attach_lora(tiny_bert(), LoraArguments(r=4), trainable_modules=["classifier"])
    full = full_trainable_params(model)
    assert set(full) == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in full.values())
    assert not full_trainable_params(attach_lora(tiny_bert(), LoraArguments(r=4)))
    with pytest.raises(ValueError, match="no_such_head"):
        attach_lora(tiny_bert(), LoraArguments(r=4), trainable_modules=["classifier", "no_such_head"])


def test_model_weights_apply_validates_before_writing():
    model = attach_lora(tiny_bert(), LoraArguments(r=4), trainable_modules=["classifier"])
    keys = sorted(lora_layers(model))
    good, other = keys[0], keys[1]
    merger = ModelWeights(model)
    targets = merger.targets([good, other, "classifier.weight"])
    snapshot = {k: t.detach().clone() for k, t in targets.items()}
    ones = {k: torch.ones_like(t) for k, t in targets.items()}
    cases = [
        ({good: ones[good], "bert.no.such.weight": ones[good]}, {good: 1.0, "bert.no.such.weight": 1.0}, "no.such"),
        ({good: ones[good], other: torch.ones(3, 3)}, {good: 1.0, other: 1.0}, "shape"),
        ({good: ones[good], other: ones[other]}, {good: 1.0, other: float("nan")}, "alpha"),
        ({good: ones[good], other: ones[other]}, {good: 1.0}, "alpha"),
        ({good: ones[good], "classifier.weight": ones[good]}, {good: 1.0, "classifier.weight": 1.0}, "shape"),
    ]
    for deltas, alpha, msg in cases:
        with pytest.raises(ValueError, match=msg):
            merger.apply(deltas, alpha)
        for key, t in targets.items():
            assert torch.equal(t, snapshot[key]), key
    assert not merger.master
    merger.apply({"classifier.weight": ones["classifier.weight"]}, {"classifier.weight": 0.5})
    assert torch.allclose(targets["classifier.weight"], snapshot["classifier.weight"] + 0.5)


def test_model_weights_apply_writes_the_bits_of_start_plus_alpha_delta():
    """`apply` adds into fp32 weights where they are: the exact bits of start + alpha * delta, for LoRA keys (start:
    the weight), fully trained keys from a given base, and per-parameter alphas."""
    model = attach_lora(tiny_bert(), LoraArguments(r=4), trainable_modules=["classifier"])
    merger, gen = ModelWeights(model), torch.Generator().manual_seed(5)
    keys = [*sorted(lora_layers(model))[:2], "classifier.weight"]
    targets = merger.targets(keys)
    start = {k: t.detach().clone() for k, t in targets.items()}
    deltas = {k: torch.randn(t.shape, generator=gen) for k, t in targets.items()}
    base = {"classifier.weight": torch.randn(targets["classifier.weight"].shape, generator=gen)}
    alpha = {keys[0]: 0.37, keys[1]: torch.rand(targets[keys[1]].shape, generator=gen), keys[2]: 0.61}
    merger.apply(deltas, alpha, base=base)
    for key in keys:
        expected = base.get(key, start[key]) + alpha[key] * deltas[key]
        assert torch.equal(targets[key], expected), key
    assert not merger.master


def test_modules_fixed_walks_once_inside_and_sees_changes_after():
    from pm_hf.method.adapters import modules_fixed

    model = attach_lora(tiny_bert(), LoraArguments(r=4), trainable_modules=["classifier"])
    walks = []
    original = type(model).named_modules

    def counting(self, *args, **kwargs):
        if self is model.base_model.model:
            walks.append(1)
        return original(self, *args, **kwargs)

    trained = set(full_trainable_params(model))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.Module, "named_modules", counting)
        with modules_fixed(model):
            with modules_fixed(model):  # nested: the outer block's walk serves
                layers = lora_layers(model)
            assert lora_layers(model) == layers and len(walks) == 1
            layers.clear()  # a caller's copy: the walk's record is not changed
            assert len(lora_layers(model)) == 2 * 2
        lora_layers(model)
        assert len(walks) == 2  # outside the block every call walks
    model.base_model.model.classifier.weight.requires_grad_(False)
    assert set(full_trainable_params(model)) == trained - {"classifier.weight"}


def test_reset_adapter_with_a_generator_is_peft_init_drawn_from_it():
    """A fresh adapter is PEFT's initialisation (A Kaiming-uniform, B = 0) drawn from the given generator only: the
    same seed gives the same A whatever the global RNG did, and it equals PEFT's own reset under that seed."""
    model = _wrapped("bert", scale=0.3)
    torch.manual_seed(123)
    reset_adapter(model, torch.Generator().manual_seed(7))
    ours = {k: f.A for k, f in adapter_factors(model).items()}
    assert all(not f.B.any() for f in adapter_factors(model).values())
    torch.manual_seed(7)
    for layer in lora_layers(model).values():
        layer.reset_lora_parameters("default", True)
    peft = {k: f.A for k, f in adapter_factors(model).items()}
    assert all(torch.equal(ours[k], peft[k]) for k in ours)


def test_task_vector_splits_lora_full_trained_and_head():
    model = attach_lora(tiny_bert(num_labels=4), LoraArguments(r=4, modules_to_save=["pooler"]),
                        trainable_modules=["classifier"])  # fmt: skip
    randomize_lora(model, seed=4)
    weights = ModelWeights(model)
    before = {k: p.detach().float().clone() for k, p in weights.trained_params().items()}
    with torch.no_grad():
        for p in weights.trained_params().values():
            p.add_(0.5)
    is_head = lambda key: key.startswith("classifier.")  # noqa: E731
    vector = weights.task_vector(before, is_head, lambda key, delta: None if key.endswith("bias") else 2 * delta)
    assert set(vector.lora) == set(lora_layers(model)) and set(vector.adapter) == set(lora_layers(model))
    assert set(vector.trained) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert set(vector.full) == {*vector.trained, "classifier.weight"}  # the head's merged part only
    torch.testing.assert_close(vector.full["classifier.weight"], torch.full((4, 16), 1.0))
    torch.testing.assert_close(vector.full["bert.pooler.dense.bias"], torch.full((16,), 0.5))
    assert list(vector.deltas)[: len(vector.lora)] == list(vector.lora)  # adapted layers first, then the rest
