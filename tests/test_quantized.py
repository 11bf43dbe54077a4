"""Bases whose weights cannot be written (QLoRA): merges kept as a frozen merged adapter next to the trained one
(`merge_into: adapter`, automatic for a quantized base). Tested on CPU with a stand-in quantized layer (int8 weights
and a scale): the merged-adapter run equals the run that writes the weights, the stand-in's weights are never
touched, the compressed adapter's error is a brute-force SVD's, and 4-bit loading without a GPU is a clear error."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors, groups, tiny_bert
from test_api import WORDNET, args, task
from torch import nn

from pm_hf.config.checks import InputError
from pm_hf.config.groups import DataArguments, LoraArguments, MergeArguments, ModelArguments
from pm_hf.continual import ContinualTrainer, run_continual
from pm_hf.method.merge import compress_factors
from pm_hf.method.weights import LowRankWeights
from pm_hf.testing import tiny_tokenizer


class Int8Linear(nn.Linear):
    """A stand-in for a quantized linear layer: int8 weights and one fp32 scale per output row, dequantized in the
    forward; nothing can be merged into it."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.scale, self.bias)


def quantized_bert(tok, seed=0):
    model = tiny_bert(num_labels=2, seed=seed)
    model.resize_token_embeddings(len(tok))
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        attention.query, attention.value = Int8Linear(attention.query), Int8Linear(attention.value)
    return model


@pytest.mark.slow  # two full runs with a merged adapter (about 40 s alone)
def test_a_merged_adapter_run_equals_the_run_that_writes_the_weights(model_dir, tmp_path):
    written = run_continual(*groups(model_dir, tmp_path / "weights"))
    adapter = run_continual(*groups(model_dir, tmp_path / "adapter", merge_into="adapter"))
    assert adapter["alphas"] == pytest.approx(written["alphas"], abs=1e-6)
    assert adapter["accuracy_matrix"] == written["accuracy_matrix"]
    state = checkpoint_tensors(tmp_path / "adapter")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("::A")}
    assert ranks == {3 * 4}  # exact: the sum of the three tasks' ranks


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), WORDNET["train"]["text"][:500])


def trainer_for(model, tok, out, tasks, **kw):
    return ContinualTrainer(model=model, args=args(out), tasks=tasks, processing_class=tok,
                            lora_args=LoraArguments(r=2), data_args=DataArguments(max_length=24), **kw)  # fmt: skip


def test_a_quantized_stand_in_is_never_written_and_merges_into_the_adapter(tmp_path, tok):
    model = quantized_bert(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.int8}
    trainer = trainer_for(model, tok, tmp_path / "run", [task(0, 1), task(2, 3)])
    results = trainer.train().results
    assert trainer.loop.low_rank and len(results["alphas"]) == 2  # chosen automatically for the int8 base
    after = [p for p in trainer.model.parameters() if p.dtype == torch.int8]  # the same layers, in the same order
    assert len(after) == len(before) == 4
    assert all(torch.equal(a, b) for a, b in zip(after, before.values()))
    layer = next(m for n, m in trainer.model.named_modules() if n.endswith("layer.0.attention.self.query"))
    factors = trainer.loop.weights.factors
    A, B = factors[next(k for k in factors if "layer.0" in k and "query" in k)]
    x = torch.randn(3, layer.in_features)
    base = layer.get_base_layer()
    with torch.no_grad():  # the layer computes the dequantized base plus the merged delta (the adapter is zero now)
        torch.testing.assert_close(layer(x), base(x) + x @ A.T @ B.T, rtol=1e-5, atol=1e-6)


def test_strategies_that_need_the_weights_are_refused_with_a_merged_adapter(tmp_path, tok):
    for method in ("task-arithmetic", "oracle-alpha"):
        with pytest.raises(InputError, match=rf"^merge_args\.merge_method = '{method}': is not available with a"):
            trainer_for(quantized_bert(tok), tok, tmp_path / method, [task(0, 1)],
                        merge_args=MergeArguments(merge_method=method)).train()  # fmt: skip


def test_a_compressed_merged_adapter_keeps_its_rank_and_records_its_error(model_dir, tmp_path, monkeypatch):
    """Each merge's recorded error (`LowRankWeights.errors`) is the worst layer's ||D - B'A'|| / ||D||, where D is the
    dense merged delta (the earlier merged adapter plus alpha s B A of the task), computed here from D itself."""
    expected, recorded = [], []
    append = LowRankWeights.append

    def recording_append(self, adapter, alpha):
        dense = {}
        for key, f in adapter.items():
            d = float(alpha[key]) * f.scaling * f.B.double() @ f.A.double()
            if key in self.factors:
                A0, B0 = self.factors[key]
                d = d + B0.double().cpu() @ A0.double().cpu()
            dense[key] = d
        append(self, adapter, alpha)
        worst = 0.0
        for key, d in dense.items():
            A, B = self.factors[key]
            assert A.shape[0] == min(3, torch.linalg.matrix_rank(d))  # the rank it was compressed to
            worst = max(worst, float(torch.linalg.norm(d - B.double().cpu() @ A.double().cpu()) / torch.linalg.norm(d)))
        expected.append(worst)
        recorded.append(self.errors[-1])

    monkeypatch.setattr(LowRankWeights, "append", recording_append)
    loop_run = run_continual(*groups(model_dir, tmp_path, merge_into="adapter", merged_adapter_rank=3))
    state = checkpoint_tensors(tmp_path)
    assert {v.shape[0] for k, v in state.items() if k.endswith("::A")} == {3}
    assert len(loop_run["alphas"]) == len(recorded) == 3
    assert all(e > 1e-3 for e in expected)  # rank 4 per task: every merge drops something
    assert recorded == pytest.approx(expected, rel=1e-4)


def test_compress_factors_against_a_dense_svd():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 9, generator=g), torch.randn(7, 6, generator=g)
    A2, B2, error = compress_factors(A, B, 2)
    s = torch.linalg.svdvals(B.double() @ A.double())
    assert error == pytest.approx(float((s[2:].square().sum() / s.square().sum()).sqrt()), rel=1e-9)
    dense = torch.linalg.svd(B.double() @ A.double())
    best = (dense.U[:, :2] * dense.S[:2]) @ dense.Vh[:2]
    torch.testing.assert_close((B2 @ A2).double(), best, rtol=1e-5, atol=1e-5)
    assert compress_factors(A, B, 6)[2] == pytest.approx(0.0, abs=1e-7)


def test_4bit_loading_without_a_gpu_is_an_input_error(tmp_path):
    from pm_hf.method.models import hub_kwargs

    with pytest.raises(InputError, match=r"^load_in_4bit = True: needs a CUDA GPU"):
        hub_kwargs(ModelArguments(model_name_or_path="x", load_in_4bit=True), weights=True)
    assert copy.copy(hub_kwargs(ModelArguments(model_name_or_path="x"), weights=True)) == {"trust_remote_code": False}


@pytest.mark.slow  # two full runs with a merged adapter (about 40 s alone)
def test_a_merged_adapter_run_resumes_and_exports_what_it_computes(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from pm_hf.run.runs import load_adapter_export

    full = run_continual(*groups(model_dir, tmp_path / "full", merge_into="adapter"))
    run_continual(*groups(model_dir, tmp_path / "staged", merge_into="adapter"), stop_after=2)
    resumed = run_continual(*groups(model_dir, tmp_path / "staged", merge_into="adapter"), resume=True)
    assert resumed["alphas"] == full["alphas"] and resumed["accuracy_matrix"] == full["accuracy_matrix"]
    batch = AutoTokenizer.from_pretrained(model_dir)(
        ["a large feline", "a feeling of joy"], return_tensors="pt", padding=True
    )
    logits = []
    for mode in ("full", "staged"):
        model = load_adapter_export(tmp_path / mode / "merged_adapter", "sequence_classification")
        with torch.no_grad():
            logits.append(model(**batch).logits)
    torch.testing.assert_close(logits[0], logits[1])
    weights_run = run_continual(*groups(model_dir, tmp_path / "weights"))
    model = load_adapter_export(tmp_path / "weights" / "merged_adapter", "sequence_classification")
    with torch.no_grad():  # the same model as the run that writes its weights
        torch.testing.assert_close(model(**batch).logits, logits[0], rtol=1e-4, atol=1e-5)
    assert weights_run["alphas"] == pytest.approx(full["alphas"], abs=1e-6)


@pytest.mark.slow  # a 2-process launch and a 1-process run (about 30 s)
def test_a_quantized_stand_in_under_zero2_equals_one_process(tmp_path):
    """The int8 stand-in base under DeepSpeed ZeRO-2 on 2 processes x batch 4 (merges into the adapter, the int8
    weights never written) against 1 process x batch 8: the same alphas and accuracy matrix."""
    import subprocess
    import sys

    from conftest import torchrun

    tokenizer = str(tmp_path / "tok")
    rank0, rank1 = torchrun(tokenizer, tmp_path / "zero2", 4, "zero2", script="quantized_script.py")
    script = str(Path(__file__).parent / "quantized_script.py")
    subprocess.run([sys.executable, script, tokenizer, str(tmp_path / "one"), "8"], check=True, capture_output=True)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert rank0 == rank1 and rank0["int8_untouched"] and one["int8_untouched"]
    assert rank0["distributed"] == {"type": "DEEPSPEED", "num_processes": 2, "sharding": "zero2"}
    assert 0.0 < one["alphas"][1] < 1.0 and rank0["alphas"] == pytest.approx(one["alphas"], abs=1e-6)
    assert rank0["accuracy_matrix"] == one["accuracy_matrix"]
