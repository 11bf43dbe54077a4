"""Continual instruction tuning end to end with a tiny random Llama and a locally built tokenizer (seconds, offline):
the loop, the Fisher on response tokens, the merge, the generalised score matrices, resume, export and the CLI."""

import json
from pathlib import Path

import pytest
import torch
from conftest import INSTRUCT, TASKS, llm_groups
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pm_hf.commands.cli import main as cli_main
from pm_hf.config.groups import RunConfig
from pm_hf.continual import build_loop, run_continual
from pm_hf.method.adapters import base_weights, lora_layers
from pm_hf.run.evaluation import generate_responses


def test_pm_on_a_tiny_llama_writes_score_matrices(llm_dir, tmp_path):
    run = build_loop(RunConfig(*llm_groups(llm_dir, tmp_path / "pm")))
    results = run.run()
    # q/k/v/o detected for the Llama family when target_modules is not set
    assert {k.rsplit(".", 2)[-2] for k in lora_layers(run.model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert results["primary_metric"] == "rougeL"
    assert set(results["score_matrices"]) == {"exact_match", "rougeL", "eval_loss"}
    assert results["accuracy_matrix"] == results["score_matrices"]["rougeL"]
    loss = results["score_matrices"]["eval_loss"]
    assert loss[0][1] is None and all(v > 0 for v in (loss[0][0], loss[1][0], loss[1][1]))
    # forgetting of a loss: how much task 0's loss went up after task 1
    summary = results["score_summaries"]["eval_loss"]
    assert summary["forgetting"] == pytest.approx(max(0.0, loss[1][0] - loss[0][0]), abs=1e-9)
    assert summary["bwt"] == pytest.approx(loss[0][0] - loss[1][0], abs=1e-9)  # < 0: the loss went up (forgetting)
    assert results["alphas"][0] == 1.0 and 0.0 <= results["alphas"][1] <= 1.0
    assert results["alpha_terms"][1]["denominator"] > 0  # a real Fisher on response tokens
    assert "til_accuracy_matrix" not in results
    out = tmp_path / "pm"
    assert (out / "score_matrix_eval_loss.png").exists() and (out / "accuracy_matrix.png").exists()

    # the exported adapter reproduces the merged model's logits and generations
    batch = run.stream.collate_fn([run.stream.tasks[0].eval[i] for i in range(3)])
    batch.pop("labels")
    run.model.eval()
    with torch.no_grad():
        expected = run.model(**batch).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dir), str(out / "merged_adapter"))
        got = loaded.eval()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4)
    eval_ds = run.stream.tasks[1].eval
    tokenizer = run.evaluator.tokenizer
    assert generate_responses(loaded, tokenizer, eval_ds, max_new_tokens=4) == generate_responses(
        run.model, tokenizer, eval_ds, max_new_tokens=4
    )


def test_llm_resume_and_sequential_baseline(llm_dir, tmp_path):
    full = run_continual(*llm_groups(llm_dir, tmp_path / "a", merge_method="seq"))
    run_continual(*llm_groups(llm_dir, tmp_path / "b", merge_method="seq"), stop_after=1)
    resumed = run_continual(*llm_groups(llm_dir, tmp_path / "b", merge_method="seq"), resume=True)
    assert resumed["score_matrices"] == full["score_matrices"]
    # seq: the deployed model after each task is that task's fine-tuned model
    assert full["accuracy_matrix"][1][1] == pytest.approx(full["pre_merge_acc"][1], abs=1e-12)


def test_bf16_keeps_an_fp32_master(llm_dir, tmp_path):
    run = build_loop(RunConfig(*llm_groups(llm_dir, tmp_path / "bf16", dtype="bfloat16", merge_method="average")))
    results = run.run()
    master = run.weights.master
    assert results["alphas"] == [1.0, 0.5]
    assert master and all(v.dtype == torch.float32 for v in master.values())
    for key, weight in base_weights(run.model).items():
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, master[key].to(torch.bfloat16))


def test_cli_trains_an_instruction_config(llm_dir, tmp_path, capsys):
    tasks = [
        {"dataset_name": "json", "data_files": {s: str(INSTRUCT / t / f"{s}.jsonl") for s in ("train", "test")}}
        for t in TASKS
    ]
    argv = [
        "train",
        "--config",
        str(Path(__file__).resolve().parents[1] / "configs" / "llm_wordnet.yaml"),
        "--model_name_or_path",
        llm_dir,
        "--task_datasets",
        json.dumps(tasks),
        "--max_train_samples",
        "8",
        "--max_eval_samples",
        "4",
        "--max_new_tokens",
        "3",
        "--per_device_train_batch_size",
        "4",
        "--dtype",
        "float32",
        "--output_dir",
        str(tmp_path / "cli"),
        "--disable_tqdm",
        "true",
    ]
    assert cli_main(argv) == 0
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert len(saved["score_matrices"]["rougeL"]) == 2
    assert "rougeL" in capsys.readouterr().out


def test_head_alignment_is_refused_for_causal_lms(llm_dir, tmp_path):
    with pytest.raises(ValueError, match="head_align"):
        run_continual(*llm_groups(llm_dir, tmp_path / "x", head_align="seen"))
    assert not (tmp_path / "x").exists()
