"""The continual state's memory per rank (docs/distributed.md, "Memory"): for model shapes built on the meta device (no
weights are allocated), what `pm` keeps next to the model — S and G (`accumulator_dtype`), the fp32 master copy of the
adapted weights (kept when the model is not fp32), and, while a task is merged, its Fisher and its dense task vector —
against the model's bf16 adapted part, for 1 and 8 ranks, under the settings that exist: the default, S and G in bf16,
and CPU offload (`accumulator_device: cpu`, `fisher_device: cpu`: S, G, the master, the Fisher and the task vector live
in host memory and the accelerator holds one layer's transient tensors at a time). The same formula is checked against
the tensors a real run holds (a tiny bf16 Llama, `--check`): S, G and the master copy after the task, and the peak's
transient part, the Fisher and the dense task vector, counted on the tensors live while `pm` merges (`merge_peak`: the
bytes of the tensors themselves, not the process's resident memory, which allocator caching and the model blur).
The big models' rows are that formula on their shapes (built on the meta device: nothing is allocated).

    python scripts/memory_table.py [--check] [--markdown]

Under FSDP2 and ZeRO-3 (see docs/distributed.md) S, G, the master copy, the Fisher and the task vector are sharded like
the weights they shadow, so every figure divides by the number of ranks (the "FSDP2, 8 ranks" columns); a 2-process run
holds exactly half of S and G per rank (`tests/test_distributed.py`). Under DDP every rank holds the whole state.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

GB = 1e9
SHAPES = {
    "Llama-3-8B": (LlamaConfig, dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8), LlamaForCausalLM),
    "Llama-3-70B": (LlamaConfig, dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
                    LlamaForCausalLM),
    "ViT-B/16": (ViTConfig, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                 image_size=224, patch_size=16, num_labels=1000), ViTForImageClassification),
}  # fmt: skip
TARGETS = {"q/k/v/o": ("q_proj", "k_proj", "v_proj", "o_proj"), "q/v": ("q_proj", "v_proj")}


def adapted_params(model: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """N: the number of weights in the LoRA-adapted linear layers (suffix match, as PEFT)."""
    return sum(
        m.weight.numel() for n, m in model.named_modules() if n.split(".")[-1] in targets and hasattr(m, "weight")
    )


def state_bytes(n: int, model_fp32: bool = False, state_dtype_bytes: int = 4) -> dict[str, int]:
    """What `pm` holds for N adapted weights: persistent (S, G, the master copy) and, during a task's merge,
    transient (its Fisher and dense task vector, fp32)."""
    out = {"S": state_dtype_bytes * n, "G": state_dtype_bytes * n, "master": 0 if model_fp32 else 4 * n}
    out.update(fisher=4 * n, task_vector=4 * n)
    out["persistent"] = out["S"] + out["G"] + out["master"]
    out["peak"] = out["persistent"] + out["fisher"] + out["task_vector"]
    return out


def table() -> list[dict]:
    rows = []
    for name, (config_cls, kwargs, model_cls) in SHAPES.items():
        with torch.device("meta"):
            model = model_cls(config_cls(**kwargs))
        for label, targets in TARGETS.items():
            n = adapted_params(model, targets)  # transformers 5 names ViT's projections as Llama's
            default, bf16 = state_bytes(n), state_bytes(n, state_dtype_bytes=2)
            rows.append({"model": name, "targets": label,
                         "adapted_params": n, "bf16_adapted_gb": 2 * n / GB,
                         "default_peak_gb": default["peak"] / GB, "default_persistent_gb": default["persistent"] / GB,
                         "bf16_state_peak_gb": bf16["peak"] / GB, "cpu_offload_host_gb": default["peak"] / GB,
                         "fsdp2_8_ranks_peak_gb": default["peak"] / 8 / GB,
                         "fsdp2_8_ranks_persistent_gb": default["persistent"] / 8 / GB,
                         "fsdp2_8_ranks_bf16_state_peak_gb": bf16["peak"] / 8 / GB,
                         "bar_8_ranks_gb": 2 * n / 8 / GB})  # fmt: skip
    return rows


@contextlib.contextmanager
def merge_peak(held: dict[str, int]):
    """Counts, while `pm` merges a task (its peak), the bytes of the tensors it holds: the task's Fisher and dense task
    vector, and S and G (`held` gets the largest seen per part; a count of the live tensors, not of host memory)."""
    from pm_hf.method.strategies.alpha import ClosedForm

    merge = ClosedForm.merge

    def counted(self, context):
        parts = {"fisher": context.fisher, "task_vector": context.vector.deltas, "S": self.S, "G": self.G}
        plan = merge(self, context)  # S and G exist for every key after it (the first task creates them)
        for name, tensors in parts.items():
            held[name] = max(held.get(name, 0), sum(v.nbytes for v in tensors.values()))
        return plan

    ClosedForm.merge = counted
    try:
        yield held
    finally:
        ClosedForm.merge = merge


def check() -> dict:
    """The formula against the tensors a real bf16 run holds after one task (tiny Llama, q/k/v/o), the transient
    ones (the Fisher and the dense task vector) counted during the merge (`merge_peak`)."""
    import tempfile

    from datasets import Dataset

    from pm_hf import ContinualTrainer, PMConfig
    from pm_hf.config.groups import LoraArguments, ModelArguments
    from pm_hf.testing import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)  # fmt: skip
    rows = [{"prompt": f"word {i}", "response": f"answer {i % 7}"} for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp, [r["prompt"] + " " + r["response"] for r in rows], max_words=60)
        model.resize_token_embeddings(len(tok))
        task = {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:4])}
        args = PMConfig(output_dir=f"{tmp}/run", num_train_epochs=1, per_device_train_batch_size=8, report_to="none",
                        use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
        lora = LoraArguments(r=2, target_modules=list(TARGETS["q/k/v/o"]))
        model_args = ModelArguments(model_name_or_path="in-memory", dtype="bfloat16")
        trainer = ContinualTrainer(model=model, args=args, tasks=[task], processing_class=tok, lora_args=lora,
                                   model_args=model_args)  # fmt: skip
        with merge_peak({}) as at_merge:
            trainer.train()
        loop = trainer.loop
        nbytes = lambda tensors: sum(v.nbytes for v in tensors.values())  # noqa: E731
        held = {"S": nbytes(loop.strategy.S), "G": nbytes(loop.strategy.G), "master": nbytes(loop.weights.master)}
    held.update(fisher=at_merge["fisher"], task_vector=at_merge["task_vector"])
    held["peak"] = at_merge["S"] + at_merge["G"] + held["master"] + held["fisher"] + held["task_vector"]
    n = adapted_params(model, TARGETS["q/k/v/o"])
    predicted = state_bytes(n)
    return {
        "adapted_params": n,
        "measured": held,
        "predicted": {k: predicted[k] for k in held},
        "match": all(held[k] == predicted[k] for k in held),
    }


def markdown(rows: list[dict]) -> str:
    """The table of docs/distributed.md ("Memory"; written there by scripts/doc_figures.py)."""
    head = ["model", "LoRA targets", "adapted weights", "bf16 adapted part",
            "pm state per rank, 1 rank or DDP: peak (persistent)", "S, G in bf16: peak", "CPU offload: host",
            "FSDP2, 8 ranks: peak (persistent)", "FSDP2, 8 ranks, S, G in bf16: peak",
            "bar, 8 ranks: bf16 part / 8"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["model"], r["targets"], f"{r['adapted_params'] / 1e9:.3f} B", f"{r['bf16_adapted_gb']:.2f} GB",
                 f"{r['default_peak_gb']:.1f} GB ({r['default_persistent_gb']:.1f} GB)",
                 f"{r['bf16_state_peak_gb']:.1f} GB", f"{r['cpu_offload_host_gb']:.1f} GB",
                 f"{r['fsdp2_8_ranks_peak_gb']:.2f} GB ({r['fsdp2_8_ranks_persistent_gb']:.2f} GB)",
                 f"{r['fsdp2_8_ranks_bf16_state_peak_gb']:.2f} GB", f"{r['bar_8_ranks_gb']:.2f} GB"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="also compare the formula with a real run's tensors")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args()
    rows = table()
    print(markdown(rows) if args.markdown else json.dumps(rows, indent=1))
    if args.check:
        print(json.dumps(check(), indent=1))


if __name__ == "__main__":
    main()
