"""The cost suite of scripts/benchmark.py (`python scripts/benchmark.py cost [--quick]`): PM / plain Trainer step
rate, Fisher pass / one epoch, alpha + merge / task training, the growth of the saved continual state and of RSS from
task 2 to task 10, and the whole pipeline against `seq-merge` (scripts/bench_pipeline.py). `run_cost` measures,
`write_reports` writes cost.json and cost.md against `BARS`."""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import statistics
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
import transformers
from datasets import Dataset
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from pm_hf import ContinualCallback, FisherArguments, LoraArguments, PMConfig, PMTrainer, estimate_fisher, merge_task
from pm_hf.config.groups import DataArguments, MergeArguments, ModelArguments
from pm_hf.distributed.placement import for_run, place
from pm_hf.hub.export import task_record
from pm_hf.method.adapters import attach_lora, base_weights, full_trainable_params, lora_layers
from pm_hf.method.strategies import build_strategy
from pm_hf.method.weights import ModelWeights
from pm_hf.testing import tiny_bert_folder

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "wordnet_supersense20"
THREADS = 2
# one training epoch of a task of the demo's size and settings (configs/demo_text_cil.yaml: 150 training samples per
# class of 2 classes, batch 16, lr 5e-3, r 8 on query/value; its preset holds a tenth out and trains 2 epochs), the
# task the Fisher pass and the merge are set against
TASK_SAMPLES = 300
# figure -> (op, bar); None: reported without a bar
BARS = {
    "pm_over_plain_step_rate": (">=", 0.97),
    "fisher_per_sample_over_epoch": ("<=", 1.5),
    "fisher_batch_over_epoch": None,
    "merge_over_train": ("<=", 0.01),
    "state_growth_10_over_2": ("<=", 1.05),
    "state_without_log_growth_10_over_2": None,
    "log_bytes_per_task": None,
    "rss_growth_10_over_2": ("<=", 1.05),
    "preset_over_seq_merge_task_time": ("<=", 1.3),
}


def _proc_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def machine_info() -> dict:
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "date": date,
            "transformers": transformers.__version__, "load_avg": os.getloadavg()}  # fmt: skip


def tiny_model_dir(tmp: Path, num_labels: int, hidden: int = 32) -> str:
    """A tiny BERT (from a config) + a WordPiece tokenizer over the data's frequent words, saved to a folder."""
    texts = pd.read_parquet(DATA / "train.parquet")["text"].tolist()
    return tiny_bert_folder(tmp / "model", texts, num_labels=num_labels, hidden=hidden)


def load_lora_model(tmp: Path):
    """all-MiniLM-L6-v2 (from the HF cache: `make install` seeds it) with LoRA r=8 on query/value and a trainable
    classifier, its placement attached as a run attaches it; a tiny BERT when it cannot be loaded."""
    path, name = "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"
    try:
        transformers.AutoConfig.from_pretrained(path)
    except OSError:
        path, name = tiny_model_dir(tmp, 20, hidden=64), "tiny-bert (all-MiniLM-L6-v2 not in the HF cache)"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    auto = transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(path, num_labels=20, ignore_mismatched_sizes=True)
    model = attach_lora(model, LoraArguments(r=8, target_modules=["query", "value"]), trainable_modules=["classifier"])
    place(model, for_run(model, fsdp=False))  # its placement attached, as a run's model has it (pm_hf.run.assembly)
    return model, tok, name


def text_dataset(tok, n: int, seed: int = 0) -> Dataset:
    frame = pd.read_parquet(DATA / "train.parquet").sample(n=n, random_state=seed, replace=n > 3000)
    ds = Dataset.from_dict({"text": frame["text"].tolist(), "labels": frame["label"].tolist()})
    return ds.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])


class StepClock(TrainerCallback):
    """perf_counter at every optimizer step's end, and around the whole train loop."""

    def __init__(self):
        self.ends: list[float] = []
        self.begin = self.end = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.ends.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kw):
        self.end = time.perf_counter()

    def rate(self, warmup: int) -> float:
        """Steps per second after the first `warmup` steps."""
        return (len(self.ends) - 1 - warmup) / (self.ends[-1] - self.ends[warmup])


def restore(model, init: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in init:
                p.copy_(init[n])


def train(model, init: dict, pm: bool, data, collate, tmp: Path, **kw) -> StepClock:
    """One training run from the same initial trainable state: PMTrainer (task_vector, eps 0.5) or plain Trainer."""
    restore(model, init)
    common = dict(output_dir=str(tmp / "trainer"), per_device_train_batch_size=16, learning_rate=5e-3, seed=0)
    common.update(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=10**6, **kw)
    args = PMConfig(perturbation="task_vector", perturb_eps=0.5, **common) if pm else TrainingArguments(**common)
    clock = StepClock()
    trainer = (PMTrainer if pm else Trainer)(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(clock)
    trainer.train()
    return clock


def bench_step_rate(model, init, tok, tmp, rounds: int, steps: int, warmup: int) -> dict:
    data, collate = text_dataset(tok, 16 * steps), DataCollatorWithPadding(tok)
    train(model, init, True, data, collate, tmp, max_steps=warmup + 2)  # discarded: first-run allocations
    rates: dict[str, list[float]] = {"plain": [], "pm": []}
    for r in range(rounds):
        for kind in ("plain", "pm") if r % 2 == 0 else ("pm", "plain"):  # ABBA: cancels drift of a shared machine
            rates[kind].append(train(model, init, kind == "pm", data, collate, tmp, max_steps=steps).rate(warmup))
    ratios = [p / q for p, q in zip(rates["pm"], rates["plain"])]
    return {"ratio": statistics.median(ratios), "ratios": ratios, "steps_per_s": rates, "steps": steps}


def bench_fisher_merge(model, init, tok, tmp, rounds: int, n: int) -> dict:
    """Per round: one PM epoch on n samples, the Fisher (per_sample, batch) on them, then alpha + merge timed."""
    data, collate = text_dataset(tok, n, seed=1), DataCollatorWithPadding(tok)
    raw: dict[str, list[float]] = {"epoch": [], "per_sample": [], "batch": [], "merge": []}
    weights, strategy = ModelWeights(model), build_strategy(MergeArguments(merge_method="pm"))
    for r in range(rounds):
        restore(model, init)
        before = {k: p.detach().float().clone() for k, p in weights.trained_params().items()}
        clock = train(model, init, True, data, collate, tmp, num_train_epochs=1)
        raw["epoch"].append(clock.end - clock.begin)
        keys = list(lora_layers(model)) + list(full_trainable_params(model))
        for mode in ("batch", "per_sample"):  # per_sample last: its Fisher is the one merged
            start = time.perf_counter()
            fargs = FisherArguments(fisher_mode=mode, fisher_batch_size=16)
            fisher = estimate_fisher(model, data, collate, fargs, keys=keys, show_progress=False)
            raw[mode].append(time.perf_counter() - start)
        start = time.perf_counter()  # what the loop times as its merge: task vector, the strategy's merge, the record
        vector = weights.task_vector(before)
        plan = merge_task(weights, strategy, r, vector, before, fisher)
        task_record(vector.adapter, plan.alpha)
        raw["merge"].append(time.perf_counter() - start)
    # each ratio is of the same round's work: the merge over the training of the task it merged (one epoch of n
    # samples, as trained), not over an extrapolated task
    ratios = lambda xs, ys: [x / y for x, y in zip(xs, ys)]  # noqa: E731
    spread = {k: ratios(raw[k], raw["epoch"]) for k in ("per_sample", "batch", "merge")}
    return {"fisher_per_sample_over_epoch": statistics.median(spread["per_sample"]),
            "fisher_batch_over_epoch": statistics.median(spread["batch"]),
            "merge_over_train": statistics.median(spread["merge"]),
            "ratios_per_round": spread, "seconds": raw, "samples": n}  # fmt: skip


def _checkpoint_breakdown(folder: Path) -> dict[str, int]:
    """Bytes of a checkpoint by part; `history` = its tensors + their safetensors header entries + JSON meta."""
    path = folder / "state.safetensors"
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    parts: Counter[str] = Counter()
    for key, info in header.items():
        group = key.split("/", 1)[0]
        parts[group] += info["data_offsets"][1] - info["data_offsets"][0] if key != "__metadata__" else 0
        parts[group] += len(json.dumps({key: info}, separators=(",", ":"))) - 2  # its header entry
    meta = json.loads((folder / "state.json").read_text())
    for key, value in meta.items():  # as save_checkpoint writes it (compact), with its comma
        size = len(json.dumps({key: value}, separators=(",", ":"), default=float)) - 2 + 1
        parts[key if key in ("history", "log") else "other_json"] += size
    parts["other_json"] += (folder / "manifest.json").stat().st_size
    if (folder / "log.json.gz").is_file():  # the per-task log, gzipped (pm_hf.run.checkpoint.LOG)
        parts["log"] += (folder / "log.json.gz").stat().st_size
    return dict(parts)


def state_bytes(snapshot: dict) -> int:
    """The continual state in a checkpoint: every file but the per-task log (S, G, theta_hat, the callbacks' state,
    the RNG states, the config, the manifest). The log is the run's results, one row per task (its growth is
    `log_bytes_per_task`; `state_growth_10_over_2` is the whole folder's)."""
    return snapshot["checkpoint_bytes"] - snapshot["parts"].get("log", 0)


def _snapshot(folder: Path) -> dict:
    gc.collect()
    files = [f for f in folder.rglob("*") if f.is_file()]
    return {
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "parts": _checkpoint_breakdown(folder),
        # the append-only per-task adapter log (adapters/task_<t>.safetensors) used only for the exact export
        "adapter_log_bytes": sum(f.stat().st_size for f in (folder.parent / "adapters").glob("*.safetensors")),
        "vm_rss": _proc_status("VmRSS"),
        "vm_hwm": _proc_status("VmHWM"),
    }


def memory_run(out: str, samples: int) -> dict:
    """10 tasks x 2 classes of a tiny BERT through run_continual (in a fresh process); snapshots after task 2, 10."""
    from pm_hf.continual import run_continual

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    tmp = Path(out) / "memory"
    tmp.mkdir()
    model_dir = tiny_model_dir(tmp, 2)
    files = {"train": str(DATA / "train.parquet"), "test": str(DATA / "test.parquet")}
    groups = [[2 * i, 2 * i + 1] for i in range(10)]
    data = DataArguments(data_files=files, class_groups=groups, max_length=24, max_eval_samples_per_class=4,
                         max_train_samples_per_class=samples)  # fmt: skip
    train_args = PMConfig(output_dir=str(tmp / "run"), num_train_epochs=1, per_device_train_batch_size=8, seed=0,
                          learning_rate=2e-2, report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    snaps: dict[int, dict] = {}

    class Snapshot(ContinualCallback):
        def on_save(self, t, checkpoint_dir):
            if t in (1, 9):
                snaps[t + 1] = _snapshot(checkpoint_dir)

    results = run_continual(
        ModelArguments(model_name_or_path=model_dir), data, train_args, LoraArguments(r=4),
        FisherArguments(fisher_max_samples=16), MergeArguments(), callbacks=[Snapshot()],
    )  # fmt: skip
    return {"after_task": snaps, "timings": results["timings"]}


def growth_analysis(a2: dict, a10: dict, model) -> dict:
    """How much of the checkpoint growth from task 2 to 10 is the per-task history; the same for this model."""
    grow = a10["checkpoint_bytes"] - a2["checkpoint_bytes"]
    by_part = {k: a10["parts"].get(k, 0) - a2["parts"].get(k, 0) for k in a10["parts"]}
    hist = lambda a: a["parts"].get("history", 0)  # noqa: E731 - 0 since the history left the checkpoint
    no_hist = (a10["checkpoint_bytes"] - hist(a10)) / (a2["checkpoint_bytes"] - hist(a2))
    layers = lora_layers(model).values()
    fixed = 3 * 4 * sum(w.numel() for w in base_weights(model).values())  # weights, S, G in fp32
    fixed += 3 * 4 * sum(p.numel() for p in full_trainable_params(model).values())
    per_task = 4 * sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel() for m in layers)
    return {"growth_bytes": grow, "growth_bytes_by_part": by_part, "ratio_without_history": no_hist,
            "history_share_of_growth": by_part.get("history", 0) / grow if grow else 0.0,
            "bench_model_tensors": {"fixed_bytes": fixed, "history_bytes_per_task": per_task,
                                    "ratio_10_over_2": (fixed + 10 * per_task) / (fixed + 2 * per_task)}}  # fmt: skip


def run_cost(quick: bool) -> tuple[dict, dict]:
    rounds, steps, samples = (3, 20, 8) if quick else (7, 60, 32)
    n_fisher = TASK_SAMPLES  # the Fisher and the merge are timed after a task of the demo's size, in either mode
    with tempfile.TemporaryDirectory(prefix="pm_hf_bench_") as tmp:
        model, tok, name = load_lora_model(Path(tmp))
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        step = bench_step_rate(model, init, tok, Path(tmp), rounds, steps, warmup=3)
        fm = bench_fisher_merge(model, init, tok, Path(tmp), rounds, n_fisher)
        pool = mp.get_context("spawn").Pool(1)  # a fresh process: its RSS is the continual run's alone
        mem = pool.apply(memory_run, (tmp, samples))
        pool.close()
        pool.join()
        a2, a10 = mem["after_task"][2], mem["after_task"][10]
        growth = growth_analysis(a2, a10, model)
        spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "scripts" / "bench_pipeline.py")
        bench_pipeline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_pipeline)  # the whole pipeline's part of the cost suite
        pipeline = bench_pipeline.pipeline_cost(Path(tmp), rounds=3, samples=60 if quick else 150)
    figures = {
        "pm_over_plain_step_rate": step["ratio"],
        "fisher_per_sample_over_epoch": fm["fisher_per_sample_over_epoch"],
        "fisher_batch_over_epoch": fm["fisher_batch_over_epoch"],
        "merge_over_train": fm["merge_over_train"],
        "state_growth_10_over_2": a10["checkpoint_bytes"] / a2["checkpoint_bytes"],  # the bar's figure, as it was set
        "state_without_log_growth_10_over_2": state_bytes(a10) / state_bytes(a2),
        "log_bytes_per_task": (a10["parts"].get("log", 0) - a2["parts"].get("log", 0)) / 8,
        "rss_growth_10_over_2": a10["vm_rss"] / a2["vm_rss"],
        "preset_over_seq_merge_task_time": pipeline["preset_over_seq_merge"],
    }
    raw = {"model": name, "quick": quick, "rounds": rounds, "step_rate": step, "memory": mem, "state_growth": growth,
           "fisher_merge": {k: v for k, v in fm.items() if k not in figures},
           "peak_rss_growth_10_over_2": a10["vm_hwm"] / a2["vm_hwm"],
           "continual_merge_over_train": [t["merge"] / t["train"] for t in mem["timings"]],
           "pipeline": pipeline}  # fmt: skip
    return figures, raw


def verdict(key: str, value: float) -> str:
    if BARS[key] is None:
        return "-"
    op, bar = BARS[key]
    return "pass" if (value >= bar if op == ">=" else value <= bar) else "FAIL"


def write_reports(out: Path, figures: dict, raw: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    # figures_version 2: every figure measured on the work it describes (scripts/doc_figures.py labels by it)
    report = {**figures, "figures_version": 2, "raw": raw, "machine": machine}
    (out / "cost.json").write_text(json.dumps(report, indent=1) + "\n")
    title = f"# Cost suite ({'quick' if raw['quick'] else 'full'}, {raw['model']}, {machine['date']}, torch "
    title += f"{torch.__version__}, transformers {transformers.__version__}, {THREADS} threads)"
    lines = [title, "", "| figure | value | bar | result |", "|---|---|---|---|"]
    for key, value in figures.items():
        bar = "-" if BARS[key] is None else f"{BARS[key][0]} {BARS[key][1]}"
        lines.append(f"| {key} | {value:.4f} | {bar} | {verdict(key, value)} |")
    (out / "cost.md").write_text("\n".join(lines) + "\n")
