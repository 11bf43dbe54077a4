"""Tests of `pm_hf.method.fisher` (docs/method.md, "Fisher estimator"): the hook-based estimate against brute-force
autograd on
single samples (gradient w.r.t. each LoRA layer's effective weight = w.r.t. its base weight), batch mode, the sample
cap, sampled labels, model-state restoration, a 2-process gloo run, normalisation and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

from pm_hf.config.groups import FisherArguments, LoraArguments
from pm_hf.method.adapters import attach_lora, lora_layers, strip_prefix
from pm_hf.method.fisher import default_fisher_keys, estimate_fisher, normalize_fisher, squared_grads

D = torch.float64


def _data(n: int, causal: bool, seed: int = 0) -> list[dict]:
    """Variable-length examples; causal ones supervise only the tokens after a random-length prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        ids = torch.randint(3, 64, (length,), generator=g)
        if causal:
            labels = ids.clone()
            labels[: int(torch.randint(1, length - 1, (1,), generator=g))] = -100
        else:
            labels = int(torch.randint(0, 4, (1,), generator=g))
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples: list[dict]) -> dict:
    """Right padding: pad id 0, attention mask 0, label -100 (token labels) on the padding."""
    n, t = len(examples), max(len(e["input_ids"]) for e in examples)
    ids, mask = torch.zeros(n, t, dtype=torch.long), torch.zeros(n, t, dtype=torch.long)
    token_labels = torch.is_tensor(examples[0]["labels"])
    labels = torch.full((n, t), -100) if token_labels else torch.tensor([e["labels"] for e in examples])
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])], mask[i, : len(e["input_ids"])] = e["input_ids"], 1
        if token_labels:
            labels[i, : len(e["input_ids"])] = e["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _bert(dtype=D, seed: int = 0, lora_dropout: float = 0.0):
    args = LoraArguments(r=4, lora_dropout=lora_dropout)
    model = attach_lora(tiny_bert(seed=seed), args, trainable_modules=["classifier"])
    randomize_lora(model, seed=seed + 1)
    return model.to(dtype)


def _lm(factory, dtype=D, **lora_kw):
    trainable = lora_kw.pop("trainable_modules", None)
    model = attach_lora(factory(), LoraArguments(r=4, **lora_kw), trainable_modules=trainable)
    randomize_lora(model)
    return model.to(dtype)


def _losses(model, batch) -> torch.Tensor:
    """Reference per-sample losses, written independently of `per_sample_loss`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    out = []
    for lg, lb in zip(logits[:, :-1], labels[:, 1:]):
        keep = lb != -100
        out.append(F.cross_entropy(lg[keep], lb[keep]))  # mean over this sample's supervised tokens
    return torch.stack(out)


def _brute(model, batches, keys) -> dict[str, torch.Tensor]:
    """(1/N) sum_k B_k (d mean-loss_k / d theta)^2 by autograd; single-sample batches give the per-sample Fisher.
    LoRA keys take the gradient w.r.t. the base weight, made trainable only for this."""
    layers = lora_layers(model)
    params = {strip_prefix(n): p for n, p in model.named_parameters()}
    targets = {k: layers[k].get_base_layer().weight if k in layers else params[k] for k in keys}
    flags = {k: t.requires_grad for k, t in targets.items()}
    model.eval()
    try:
        for t in targets.values():
            t.requires_grad_(True)
        total, n = {k: torch.zeros(t.shape, dtype=D) for k, t in targets.items()}, 0
        for batch in batches:
            losses = _losses(model, batch)
            grads = torch.autograd.grad(losses.mean(), list(targets.values()))
            for k, g in zip(targets, grads):
                total[k] += len(losses) * g.double().square()
            n += len(losses)
    finally:
        for k, t in targets.items():
            t.requires_grad_(flags[k])
    return {k: v / n for k, v in total.items()}


def _assert_close(fisher, ref, tol):
    assert set(fisher) == set(ref)
    for k, r in ref.items():
        assert fisher[k].shape == r.shape and fisher[k].dtype == torch.float32, k
        assert r.norm() > 0, k
        err = float((fisher[k].double() - r).norm() / r.norm())
        assert err <= tol, (k, err)


@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_classifier_per_sample_matches_brute_force(dtype):
    model, data = _bert(dtype), _data(12, causal=False)
    keys = default_fisher_keys(model)
    assert set(keys) == set(lora_layers(model)) | {"classifier.weight", "classifier.bias"} and len(keys) == 6
    fisher = estimate_fisher(model, data, collate, FisherArguments(fisher_batch_size=5), show_progress=False)
    _assert_close(fisher, _brute(model, [collate([e]) for e in data], keys), 1e-5)  # unpadded single samples


@pytest.mark.parametrize(
    "factory, lora_kw",
    [
        (tiny_llama, {"target_modules": ["q_proj", "v_proj"]}),
        (tiny_gpt2, {"trainable_modules": ["mlp.c_fc"]}),  # Conv1D: LoRA c_attn (fan_in_fan_out) + a full Conv1D
    ],
)
def test_causal_lm_per_sample_matches_brute_force(factory, lora_kw):
    model, data = _lm(factory, **lora_kw), _data(9, causal=True, seed=2)
    keys = default_fisher_keys(model)
    fisher = estimate_fisher(model, data, collate, FisherArguments(fisher_batch_size=4), show_progress=False)
    _assert_close(fisher, _brute(model, [collate([e]) for e in data], keys), 1e-5)
    if factory is tiny_gpt2:  # keys keep the base weight's (in, out) layout; the non-square c_fc catches a transpose
        assert fisher["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)
        assert fisher["transformer.h.1.mlp.c_fc.weight"].shape == (16, 64)


def test_batch_mode_matches_brute_force_and_is_below_per_sample():
    model, data = _bert(), _data(12, causal=False)
    args = FisherArguments(fisher_mode="batch", fisher_batch_size=5)
    fisher = estimate_fisher(model, data, collate, args, show_progress=False)
    batches = [collate(data[i : i + 5]) for i in range(0, 12, 5)]  # sizes 5, 5, 2, no shuffling
    _assert_close(fisher, _brute(model, batches, default_fisher_keys(model)), 1e-5)
    per_sample = estimate_fisher(model, data, collate, FisherArguments(fisher_batch_size=5), show_progress=False)
    for k in fisher:  # B (mean g)^2 <= sum g^2 entrywise (Cauchy-Schwarz), strictly somewhere
        assert (fisher[k] <= per_sample[k] * (1 + 1e-5) + 1e-12).all() and (fisher[k] < 0.9 * per_sample[k]).any()


def test_max_samples_and_sampled_labels():
    model, data = _bert(), _data(12, causal=False)
    cap, seed = 7, 3
    fisher = estimate_fisher(
        model,
        data,
        collate,
        FisherArguments(fisher_max_samples=cap, fisher_batch_size=3),
        seed=seed,
        show_progress=False,
    )
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:cap].tolist()
    keys = default_fisher_keys(model)
    _assert_close(fisher, _brute(model, [collate([data[i]]) for i in chosen], keys), 1e-5)
    full = estimate_fisher(model, data, collate, FisherArguments(fisher_batch_size=3), show_progress=False)
    assert max(float((fisher[k] - full[k]).norm() / full[k].norm()) for k in keys) > 1e-2  # really a subset

    args = FisherArguments(fisher_labels="sampled", fisher_batch_size=5)
    sampled = estimate_fisher(model, data, collate, args, seed=5, show_progress=False)
    again = estimate_fisher(model, data, collate, args, seed=5, show_progress=False)
    assert set(sampled) == set(keys)
    for k in keys:
        assert torch.isfinite(sampled[k]).all() and (sampled[k] >= 0).all() and sampled[k].sum() > 0
        assert torch.equal(sampled[k], again[k])  # seeded
    assert max(float((sampled[k] - full[k]).norm() / full[k].norm()) for k in keys) > 1e-2


@pytest.mark.parametrize("training", [True, False])
def test_model_state_is_restored(training):
    model, data = _bert(torch.float32, lora_dropout=0.5), _data(6, causal=False)
    ref = estimate_fisher(model.eval(), data, collate, FisherArguments(fisher_batch_size=4), show_progress=False)
    model.train(training)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = estimate_fisher(model, data, collate, FisherArguments(fisher_batch_size=4), show_progress=False)
    assert all(torch.equal(fisher[k], ref[k]) for k in ref)  # estimated in eval mode: the LoRA dropout is off

    def check():
        assert all(m.training == training for m in model.modules())
        for n, p in model.named_parameters():
            assert p.grad is None and p.requires_grad == flags[n] and torch.equal(p, before[n]), n
        assert all(not m._forward_hooks for m in model.modules())
        assert all(not layer._forward_hooks for layer in lora_layers(model).values())

    check()

    def bad_collate(examples):  # a failure mid-pass must still remove the hooks and restore the mode
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        estimate_fisher(model, data, bad_collate, FisherArguments(), show_progress=False)
    check()


def distributed_fisher(path: str, rank: int) -> None:
    """The Fisher on one rank of a gloo group (tests/test_gloo.py): `estimate_fisher` splits the samples over the
    ranks and all-reduces; rank 0 saves it to `path`."""
    fisher = single_process_fisher()
    if rank == 0:
        torch.save(fisher, path)


def single_process_fisher() -> dict:
    """The Fisher of 11 samples of the tiny BERT (in a process group: over its ranks, all-reduced)."""
    return estimate_fisher(
        _bert(torch.float32),
        _data(11, causal=False),
        collate,
        FisherArguments(fisher_batch_size=3),
        show_progress=False,
    )


def test_normalize_fisher():
    g = torch.Generator().manual_seed(0)
    f = {"a.weight": torch.rand(3, 4, generator=g) * 1e-4, "b.bias": torch.rand(5, generator=g) * 7}
    norm = normalize_fisher(f, "mean")
    flat = torch.cat([v.reshape(-1).double() for v in norm.values()])
    assert abs(float(flat.mean()) - 1.0) < 1e-6
    ratios = torch.cat([(norm[k] / f[k]).reshape(-1) for k in f])
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-6)  # one global scale, not per key
    same = normalize_fisher(f, "none")
    assert set(same) == set(f) and all(torch.equal(same[k], f[k]) for k in f)
    zeros = normalize_fisher({"a.weight": torch.zeros(2, 2)}, "mean")
    assert torch.equal(zeros["a.weight"], torch.zeros(2, 2))
    with pytest.raises(ValueError):
        normalize_fisher(f, "max")
    copy = {k: v.clone() for k, v in f.items()}
    inplace = normalize_fisher(copy, "mean", inplace=True)  # the loop's own pass: rescaled where it lies
    assert all(inplace[k] is copy[k] and torch.equal(inplace[k], norm[k]) for k in f)


@pytest.mark.parametrize("at_once", [True, False])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_squared_grads_by_hand(batch, at_once, monkeypatch):
    """Per sample: sum_n (g_n^T x_n)^2, the [B, out, in] gradients made at once or (a layer over the size limit) one
    sample at a time; batch mode: B (mean gradient)^2. At once, the sum is the one the pass has always taken."""
    import pm_hf.method.fisher as fisher

    monkeypatch.setattr(fisher, "AT_ONCE_BYTES", fisher.AT_ONCE_BYTES if at_once else 0)
    g = torch.Generator().manual_seed(batch)
    grads, inputs = torch.randn(batch, 3, 5, generator=g), torch.randn(batch, 3, 4, generator=g)
    weight, bias = squared_grads(grads, inputs, per_sample=True)
    by_sample = torch.stack([grads[n].T @ inputs[n] for n in range(batch)])  # [B, out, in]
    if at_once:
        assert torch.equal(weight, torch.einsum("bto,bti->boi", grads, inputs).square().sum(0))
    torch.testing.assert_close(weight, (by_sample**2).sum(0))
    torch.testing.assert_close(bias, (grads.sum(1) ** 2).sum(0))
    weight, bias = squared_grads(grads, inputs, per_sample=False)
    torch.testing.assert_close(weight, by_sample.mean(0) ** 2 * batch)
    torch.testing.assert_close(bias, grads.sum(1).mean(0) ** 2 * batch)


def test_errors():
    model, data = _bert(torch.float32), _data(4, causal=False)
    with pytest.raises(ValueError):
        estimate_fisher(model, [], collate, show_progress=False)
    lora_key = next(iter(lora_layers(model)))
    for bad in ("bert.embeddings.LayerNorm.weight", "bert.embeddings.word_embeddings.weight", "bert.nope.weight"):
        with pytest.raises(ValueError):
            estimate_fisher(model, data, collate, keys=[lora_key, bad], show_progress=False)
    assert all(not m._forward_hooks for m in model.modules())


def test_fisher_device_places_the_result_without_changing_it():
    """`fisher_device` accumulates the result on that device (on a CPU-only machine this checks the placement path and
    that the values are unchanged, not a real cross-device move)."""
    model, data = _bert(), _data(6, causal=False)
    default = estimate_fisher(model, data, collate_fn=collate, args=FisherArguments(fisher_batch_size=3))
    placed = estimate_fisher(
        model, data, collate_fn=collate, args=FisherArguments(fisher_batch_size=3, fisher_device="cpu")
    )
    assert set(placed) == set(default)
    for key, value in placed.items():
        assert value.device == torch.device("cpu") and value.dtype == torch.float32
        torch.testing.assert_close(value, default[key], rtol=0, atol=0)


def test_passes_run_longest_first_and_give_the_same_fisher_and_features(monkeypatch):
    """The per-sample Fisher and the head features are computed in length-sorted batches (little padding): the order
    is longest first with ties as given (a list and a `datasets.Dataset` alike), and the Fisher and the features
    (back in dataset order) equal those of the passes in dataset order, to 1e-6."""
    import datasets

    import pm_hf.heads.alignment as alignment
    import pm_hf.method.fisher as fisher_module

    data = _data(12, causal=False, seed=3)
    lengths = [len(e["input_ids"]) for e in data]
    order = fisher_module.by_length(data, range(12))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert all(a < b for a, b in zip(order, order[1:]) if lengths[a] == lengths[b])  # ties keep their order
    table = datasets.Dataset.from_list([{"input_ids": e["input_ids"].tolist(), "labels": e["labels"]} for e in data])
    assert fisher_module.by_length(table.with_format("torch"), [5, 0, 7]) == fisher_module.by_length(data, [5, 0, 7])
    model = _bert(torch.float32)
    args = FisherArguments(fisher_batch_size=4)
    sorted_fisher = estimate_fisher(model, data, collate, args, show_progress=False)
    head = model.base_model.model.classifier
    feats, labels = alignment.head_features(model, head, data, collate, 4)
    for module in (fisher_module, alignment):
        monkeypatch.setattr(module, "by_length", lambda dataset, indices: list(indices))
    in_order = estimate_fisher(model, data, collate, args, show_progress=False)
    for k, v in in_order.items():
        assert float((sorted_fisher[k] - v).abs().max()) <= 1e-6 * float(v.abs().max()), k
    ref, ref_labels = alignment.head_features(model, head, data, collate, 4)
    assert torch.equal(labels, ref_labels) and torch.equal(labels, torch.tensor([e["labels"] for e in data]))
    assert torch.allclose(feats, ref, rtol=0, atol=1e-6)
