"""The memory table's formula (scripts/memory_table.py) against the tensors a real run holds, and the shapes it counts
against a hand count."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SCRIPTS = Path(__file__).parents[1] / "scripts"
spec = importlib.util.spec_from_file_location("memory_table", SCRIPTS / "memory_table.py")
memory_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_table)


def test_adapted_weights_of_a_llama_by_hand():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50))  # fmt: skip
    kv = 64 // 4 * 2  # head_dim x kv heads
    qkvo = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert memory_table.adapted_params(model, qkvo) == 3 * (2 * 64 * 64 + 2 * kv * 64)
    assert memory_table.adapted_params(model, ("q_proj", "v_proj")) == 3 * (64 * 64 + kv * 64)


def test_the_formula_is_what_a_bf16_run_holds():
    result = memory_table.check()
    assert result["match"], result
    assert result["measured"]["master"] == 4 * result["adapted_params"]  # bf16 model: an fp32 master copy
    # the transient part of the peak, counted on the tensors live during the merge: the Fisher and the dense task
    # vector, fp32, one value per adapted weight each
    n = result["adapted_params"]
    assert result["measured"]["fisher"] == result["measured"]["task_vector"] == 4 * n
    assert result["measured"]["peak"] == result["predicted"]["peak"] == 4 * n * 5  # S, G, master, Fisher, vector


def test_bf16_state_halves_s_and_g():
    n = 1000
    assert memory_table.state_bytes(n, state_dtype_bytes=2)["persistent"] == 2 * n + 2 * n + 4 * n
    assert memory_table.state_bytes(n, model_fp32=True)["master"] == 0


@pytest.mark.slow
def test_the_measured_state_is_the_formula_plus_one_keys_transient():
    """A process runs two tasks of `pm` on a bf16 Llama with 2048 x 2048 projections (scripts/memory_measured.py): the
    live tensors it keeps grow by the formula's persistent bytes (S, G, the master copy), and its peak resident memory
    is the formula's peak plus at most what one key's alpha sums take (float64 copies: 24 bytes per weight of the
    largest key) and a margin. Replacing S and G as whole sets (8 bytes per adapted weight more), a second copy of the
    Fisher (4 more) or a batch's per-sample gradients of a layer made at once (16 x 16 MB) would each break it."""
    import sys

    sys.path.insert(0, str(SCRIPTS))
    import memory_measured

    shape = dict(vocab_size=256, hidden_size=2048, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
    row = memory_measured.measure("test", "float32", shape)
    measured, predicted, largest = row["measured"], row["predicted"], 2048 * 2048
    assert row["adapted_params"] == 2 * (2 * 2048 * 2048 + 2 * 512 * 2048)
    assert abs(measured["persistent_tensors"] - predicted["persistent"]) < 5e6  # bytes: a few small tensors
    assert measured["peak"] - predicted["peak"] < 1.25 * 24 * largest + 32e6, row
