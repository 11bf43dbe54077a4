"""The memory table's `pm` state measured on the work it describes (docs/distributed.md, "Memory"): the resident
memory of a process that runs two tasks of a bf16 Llama-shaped model on the CPU, read from /proc/self/status at the
points where the state changes, against the formula of scripts/memory_table.py for the same model.

    python scripts/memory_measured.py [--models NAME ...] [--out results/memory]   # writes <out>/measured.json

(docs/distributed.md's measured table is written from it by scripts/doc_figures.py.)

Each model runs in a fresh process with glibc's mmap threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`), so every
tensor over that size is its own mapping, returned to the system when freed: resident memory then follows the live
tensors instead of the allocator's cache. The points, in the second task (the first task's merge creates the state):

- persistent: resident memory before the second task's task vector is taken, less the same point of the first task
  (both hold the model, a fresh adapter and its trained values; the second also holds S, G and the fp32 master copy);
- peak: the highest resident memory (VmHWM, reset at the second task's task vector) from there to the end of its
  merge, less the first task's point: S, G, the master, the dense task vector and the Fisher, plus what the Fisher
  pass and the merge allocate on the way (activations, per-layer temporaries).

With `accumulator_device: cpu` the same tensors live in host memory, so on a GPU these figures are the "CPU offload:
host" column; the accelerator-side figures need a GPU (not measured here). The Llama-3-8B row keeps 2 of its 32
layers and a 1,024-token vocabulary (the state is per adapted layer; the table's row is 16 times the layers measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODELS = {
    "SmolLM2-135M": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    **{f"Llama-3-8B, {n} of 32 layers": dict(vocab_size=1024, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=n, num_attention_heads=32, num_key_value_heads=8)
       for n in (2, 4)},
}  # fmt: skip
TINY = dict(vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)  # fmt: skip
STATES = {"fp32 S, G": "float32", "bf16 S, G": "bfloat16"}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def resident() -> int:
    """The process's anonymous resident memory (RssAnon: its heap and mappings, not the pages of the libraries and
    files it has read, which grow as new code runs), after a garbage collection."""
    gc.collect()
    return proc_status("RssAnon")


def tensor_bytes() -> int:
    """The bytes of every torch tensor alive in the process that Python can reach (each storage once)."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class Peak:
    """The highest RssAnon seen since `reset`, sampled every millisecond by a thread (Linux keeps a peak only of the
    whole resident memory, VmHWM, which counts the library pages too)."""

    def __init__(self):
        self.high, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.wait(0.001):
            self.high = max(self.high, proc_status("RssAnon"))

    def reset(self) -> None:
        self.high = proc_status("RssAnon")


def recorded_run(shape: dict, state_dtype: str) -> dict:
    """Two tasks of a Llama of this shape in this process; the anonymous resident memory at the points the docstring
    names, per task. A run of a tiny model of the same family goes first, unrecorded: the code the loop runs after a
    task (its plots, its generation) imports libraries then, and their memory would count as the state's."""
    from pm_hf.method.strategies.alpha import ClosedForm
    from pm_hf.run.loop import ContinualLoop

    two_tasks(TINY, state_dtype)
    points: list[dict] = []
    task_vector, merge, peak = ContinualLoop.task_vector, ClosedForm.merge, Peak()

    def at_task_vector(self, t, task, before):
        points.append({"before_task_vector": resident(), "tensors_before_task_vector": tensor_bytes()})
        peak.reset()
        vector = task_vector(self, t, task, before)
        points[-1]["after_task_vector"] = resident()
        return vector

    def at_merge(self, context):
        points[-1]["merge_begins"] = resident()
        plan = merge(self, context)
        points[-1]["merge_ends"], points[-1]["peak"] = resident(), peak.high
        return plan

    ContinualLoop.task_vector, ClosedForm.merge = at_task_vector, at_merge
    try:
        two_tasks(shape, state_dtype)
    finally:
        ContinualLoop.task_vector, ClosedForm.merge = task_vector, merge
        peak.stop.set()
    return {"points": points}


def two_tasks(shape: dict, state_dtype: str) -> None:
    """`pm` (its defaults) on two small instruction tasks of a bf16 Llama of this shape, r = 8 on q/k/v/o."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from pm_hf import ContinualTrainer, PMConfig
    from pm_hf.config.groups import LoraArguments, MergeArguments, ModelArguments
    from pm_hf.testing import tiny_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    rows = [{"prompt": f"word {i}", "response": f"answer {i % 7}"} for i in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(tmp, [r["prompt"] + " " + r["response"] for r in rows], max_words=60)
        model.resize_token_embeddings(len(tok))
        tasks = [{"train": Dataset.from_list(rows[i::2]), "test": Dataset.from_list(rows[i:4:2])} for i in (0, 1)]
        args = PMConfig(output_dir=f"{tmp}/run", num_train_epochs=1, per_device_train_batch_size=4,
                        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
        trainer = ContinualTrainer(
            model=model, args=args, tasks=tasks, processing_class=tok,
            lora_args=LoraArguments(r=8, target_modules=QKVO),
            model_args=ModelArguments(model_name_or_path="in-memory", dtype="bfloat16", max_new_tokens=2),
            merge_args=MergeArguments(accumulator_dtype=state_dtype),
        )  # fmt: skip
        trainer.train()


def figures(model_name: str, shape: dict, state_dtype: str, points: list[dict]) -> dict:
    """The measured parts (bytes) next to the formula's for the same adapted weights."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import memory_table
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        n = memory_table.adapted_params(LlamaForCausalLM(LlamaConfig(**shape)), tuple(QKVO))
    formula = memory_table.state_bytes(n, state_dtype_bytes=2 if state_dtype == "bfloat16" else 4)
    first, second = points
    measured = {
        "persistent": second["before_task_vector"] - first["before_task_vector"],
        "persistent_tensors": second["tensors_before_task_vector"] - first["tensors_before_task_vector"],
        "task_vector": second["after_task_vector"] - second["before_task_vector"],
        "peak": second["peak"] - first["before_task_vector"],
    }
    predicted = {k: formula[k.removesuffix("_tensors")] for k in measured}
    return {"model": model_name, "state_dtype": state_dtype, "adapted_params": n, "measured": measured,
            "predicted": predicted, "measured_over_predicted": {k: measured[k] / predicted[k] for k in measured},
            "points": points}  # fmt: skip


def measure(model_name: str, state_dtype: str, shape: dict | None = None) -> dict:
    """`recorded_run` in a fresh process (its own resident memory, the fixed mmap threshold), for a model of `MODELS`
    or of the given shape (LlamaConfig arguments)."""
    shape = shape or MODELS[model_name]
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); import memory_measured as m; "
            f"print(json.dumps(m.recorded_run({shape!r}, {state_dtype!r})))")  # fmt: skip
    env = {**os.environ, **MALLOC, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{model_name} ({state_dtype}) failed:\n{done.stderr[-4000:]}")
    return figures(model_name, shape, state_dtype, json.loads(done.stdout.strip().splitlines()[-1])["points"])


def markdown(rows: list[dict]) -> str:
    """The measured table of docs/distributed.md (written there by scripts/doc_figures.py)."""
    head = ["model", "S, G", "adapted weights", "persistent, live tensors: measured / formula",
            "persistent, process: measured / formula", "task vector: measured / formula",
            "peak, process: measured / formula"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        cells = [r["model"], next(k for k, v in STATES.items() if v == r["state_dtype"]),
                 f"{r['adapted_params'] / 1e6:.1f} M"]  # fmt: skip
        parts = ("persistent_tensors", "persistent", "task_vector", "peak")
        cells += [f"{m[k] / 1e9:.3f} / {p[k] / 1e9:.3f} GB ({m[k] / p[k]:.3f})" for k in parts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "memory")
    args = parser.parse_args()
    rows = [measure(name, dtype) for name in args.models for dtype in STATES.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "measured.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
