"""The memory table's formula (scripts/memory_table.py) against the tensors a real run holds, and the shapes it counts
against a hand count."""

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

spec = importlib.util.spec_from_file_location("memory_table", Path(__file__).parents[1] / "scripts" / "memory_table.py")
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
