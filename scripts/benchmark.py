"""Benchmarks of pm_hf (docs/results.md). Ratios are measured side by side in one run; medians.

    python scripts/benchmark.py cost [--quick] [--out results/cost]
    python scripts/benchmark.py text-cil|vision-cil [--methods pm seq ...] [--seeds 3] [--out results/<suite>]

Accuracy suites: every (method, seed) is one `pm-hf train` run of `configs/bench_<suite>.yaml` plus the method's
overrides (`METHODS`); finished runs are skipped (the suite is resumable, an interrupted run resumes from its last
task). Per run a compact JSON goes to `<out>/runs/<method>/seed<k>.json` (committed); checkpoints and adapters stay
in `outputs/bench/<suite>/` (not committed). `<out>/summary.json`, `<out>/table.md` (mean +- std over seeds of ACC,
AAA, BWT, forgetting, within-task ACC, alpha per task) and `<out>/curves.png` are rebuilt from all finished runs;
`--docs` also copies the table into docs/results.md, between `<!-- results:<suite> -->` and `<!-- /results:<suite> -->`;
`python scripts/doc_figures.py` then rewrites every other figure of the README and docs/ from results/.

`cost`: PM / plain Trainer step rate, Fisher pass / one epoch, alpha + merge / task training, and the growth of the
saved continual state and of RSS from task 2 to task 10. The last stdout line is one JSON object with the figures;
`<out>/cost.json` adds raw timings and versions, `<out>/cost.md` is the table against the bars.
"""

# ruff: noqa: E402  (the offline switches must be set before transformers is imported)
from __future__ import annotations

import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import datetime
import gc
import importlib.util
import json
import math
import multiprocessing as mp
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
import yaml
from datasets import Dataset
from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from pm_hf import ContinualCallback, FisherArguments, LoraArguments, PMConfig, PMTrainer, estimate_fisher, merge_task
from pm_hf.config.groups import DataArguments, MergeArguments, ModelArguments
from pm_hf.config.presets import get_preset
from pm_hf.distributed.placement import for_run, place
from pm_hf.hub.export import task_record
from pm_hf.method.adapters import attach_lora, base_weights, full_trainable_params, lora_layers
from pm_hf.method.strategies import build_strategy
from pm_hf.method.weights import ModelWeights
from pm_hf.run.metrics import plot_method_curves, seen_accuracy
from pm_hf.testing import tiny_bert_folder

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "wordnet_supersense20"
THREADS = 2
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
    rounds, steps, n_fisher, samples = (3, 20, 96, 8) if quick else (7, 60, 300, 32)
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


# ------------------------------------------------------------------------------------------ accuracy suites
SUITES = {
    "text-cil": ROOT / "configs" / "bench_text_cil.yaml",
    "vision-cil": ROOT / "configs" / "bench_vision_cil.yaml",
    "text-cil-10": ROOT / "configs" / "bench_text_cil_10.yaml",
    "vision-cil-10": ROOT / "configs" / "bench_vision_cil_10.yaml",
    "llm-instruct": ROOT / "configs" / "llm_wordnet.yaml",  # needs scripts/convert_smollm2.py once; not in CI
    # the LLM track in a realistic regime (issue 24): 100 optimizer steps per task; needs the same conversion
    "llm-instruct-long": ROOT / "configs" / "llm_wordnet_long.yaml",
}
_NO_PERTURB = {"perturbation": "none"}
# method -> (overrides of the suite config, one-line description). Baselines train without perturbation (as in the
# paper's tables); P&M variants and the oracle train with it.
_PROTO = {"head_align": "prototypes", "head_align_drift": "sdc"}
_LOG = {"log_loss_increase": True}
# a method key, not a config field: the backbone's learning rate is this times the suite's `learning_rate`, the head
# keeps the full rate (`head_learning_rate`)
BACKBONE_LR_SCALE = "backbone_lr_scale"
METHODS: dict[str, tuple[dict, str]] = {
    "seq": ({"merge_method": "seq", **_NO_PERTURB}, "one LoRA continued through all tasks, no merge"),
    "seq-merge": ({"merge_method": "seq-merge", **_NO_PERTURB}, "new LoRA per task, merged with alpha = 1"),
    "average": ({"merge_method": "average", **_NO_PERTURB}, "alpha_t = 1/t (model averaging)"),
    "coma": ({"merge_method": "coma", "fixed_alpha": 0.5, **_NO_PERTURB}, "fixed alpha = 0.5"),
    "cofima": (
        {"merge_method": "cofima", "cofima_weight": 0.5, **_NO_PERTURB},
        "Fisher-weighted per parameter, a = 0.5",
    ),
    "task-arithmetic": (
        {"merge_method": "task-arithmetic", "merge_scale": 0.5, **_NO_PERTURB},
        "independent fine-tunes from theta_0, theta_0 + 0.5 sum tau",
    ),
    "ties": (
        {"merge_method": "ties", "merge_scale": 1.0, "ties_density": 0.2, **_NO_PERTURB},
        "independent fine-tunes, TIES (density 0.2, lambda 1)",
    ),
    "magmax": (
        {"merge_method": "magmax", "merge_scale": 1.0, **_NO_PERTURB},
        "sequential fine-tuning, max-magnitude merge",
    ),
    "merge-only": ({"merge_method": "pm", **_NO_PERTURB}, "closed-form alpha, no perturbation"),
    "pm": ({"merge_method": "pm", "perturbation": "task_vector"}, "P&M as specified (closed form + task-vector eps)"),
    "pm-gaussian": ({"merge_method": "pm", "perturbation": "gaussian"}, "closed form + isotropic noise"),
    # the perturbation's strength, for the LLM track's sweep (eps 0 is merge-only, eps 0.5 is pm)
    "pm-eps-0.1": ({"merge_method": "pm", "perturbation": "task_vector", "perturb_eps": 0.1}, "P&M with eps 0.1"),
    "pm-eps-0.25": ({"merge_method": "pm", "perturbation": "task_vector", "perturb_eps": 0.25}, "P&M with eps 0.25"),
    # the LLM track's candidate for its recommended settings (docs/results.md, llm-instruct-long): the closed form with
    # each task's Fisher scaled to unit mean (every task weighs the same, its Fisher says where), no perturbation
    "merge-only-fisher-mean": (
        {"merge_method": "pm", "fisher_normalize": "mean", **_NO_PERTURB},
        "closed-form alpha with each task's Fisher scaled to unit mean, no perturbation",
    ),
    "oracle-alpha": (
        {"merge_method": "oracle-alpha", "perturbation": "task_vector"},
        "P&M training, alpha per task from a 0.1 grid by accuracy on the eval sets (upper bound)",
    ),
    "joint": ({"merge_method": "joint", **_NO_PERTURB}, "all tasks' data at once (upper bound)"),
    # remedies for alpha collapse (docs/method.md): P&M + one change each
    "pm-fisher-mean": ({"merge_method": "pm", "fisher_normalize": "mean"}, "P&M, each F_t scaled to unit mean"),
    "pm-sampled": ({"merge_method": "pm", "fisher_labels": "sampled"}, "P&M, Fisher with sampled labels"),
    "pm-align": ({"merge_method": "pm", "head_align": "seen"}, "P&M + head alignment over all seen classes"),
    "pm-floor": ({"merge_method": "pm", "alpha_min": 0.2}, "P&M with alpha >= 0.2"),
    "pm-floor-0.5": ({"merge_method": "pm", "alpha_min": 0.5}, "P&M with alpha >= 0.5"),
    "pm-align-task": (
        {"merge_method": "pm", "head_align": "task"},
        "P&M + head alignment within the task's classes",
    ),
    "pm-proto": (
        get_preset("pm-proto"),  # the shipped, recommended preset itself
        "P&M + class-balanced head alignment on stored class prototypes, drift-compensated (no old data)",
    ),
    "pm-proto-nodrift": (
        {**get_preset("pm-proto"), "head_align_drift": "none"},
        "pm-proto without the drift compensation of the stored class means",
    ),
    # the preset's head alignment on two baselines: how much of pm-proto's gain is the alignment alone
    "coma-proto": (
        {
            "merge_method": "coma",
            "fixed_alpha": 0.5,
            "head_align": "prototypes",
            "head_align_drift": "sdc",
            **_NO_PERTURB,
        },
        "fixed alpha = 0.5 + the prototype head alignment of pm-proto",
    ),
    "merge-only-proto": (
        {"merge_method": "pm", "head_align": "prototypes", "head_align_drift": "sdc", **_NO_PERTURB},
        "closed-form alpha, no perturbation + the prototype head alignment of pm-proto",
    ),
    # the baselines the alpha-collapse diagnosis calls for (docs/method.md), and the oracle with the preset's head
    "fixed-1-eps": (
        {"merge_method": "coma", "fixed_alpha": 0.5, "perturbation": "task_vector", "perturb_eps": 0.5},
        "P&M training, alpha = 1 - eps = 0.5 (the point the b = -1 branch trains at)",
    ),
    "sqrt-t": ({"merge_method": "sqrt-t", "perturbation": "task_vector"}, "P&M training, alpha_t = 1/sqrt(t)"),
    "fixed-1-eps-proto": (
        {"merge_method": "coma", "fixed_alpha": 0.5, "perturbation": "task_vector", "perturb_eps": 0.5, **_PROTO},
        "fixed-1-eps + the prototype head alignment of pm-proto",
    ),
    "sqrt-t-proto": (
        {"merge_method": "sqrt-t", "perturbation": "task_vector", **_PROTO},
        "sqrt-t + the prototype head alignment of pm-proto",
    ),
    "fixed-0.2-proto": (
        {"merge_method": "coma", "fixed_alpha": 0.2, "perturbation": "task_vector", "perturb_eps": 0.5, **_PROTO},
        "P&M training, alpha = 0.2 (the oracle's range after task 1) + the prototype head alignment",
    ),
    "oracle-alpha-proto": (
        {"merge_method": "oracle-alpha", "perturbation": "task_vector", **_PROTO},
        "the oracle alpha (0.1 grid, eval-set accuracy) + the prototype head alignment: the preset's upper bound",
    ),
    # calibrated closed forms (docs/method.md): the Fisher's shape, each task's scale measured
    "pm-secant": ({"merge_method": "pm", "alpha_calibration": "secant", **_LOG}, "P&M, secant-calibrated Fisher"),
    "pm-branch": (
        {"merge_method": "pm", "alpha_calibration": "branch", **_LOG},
        "P&M, Fisher calibrated by the perturbation's branch losses",
    ),
    "pm-curve": (
        {"merge_method": "pm", "alpha_calibration": "curve", **_LOG},
        "P&M, alpha from the measured held-out loss curve of the new task + calibrated old tasks",
    ),
    "pm-fisher-perturbed": (
        {"merge_method": "pm", "fisher_point": "perturbed", **_LOG},
        "P&M, the Fisher taken with the adapter at 1 - eps (where the b = -1 branch trains)",
    ),
    "pm-fisher-seen": (
        {"merge_method": "pm", "fisher_classes": "seen", **_LOG},
        "P&M, the Fisher of the cross-entropy over all seen classes",
    ),
    "pm-bf16-state": (
        {"merge_method": "pm", "perturbation": "task_vector", "accumulator_dtype": "bfloat16"},
        "pm with S and G stored in bf16 (updates in fp32): the alpha error of half the state",
    ),
    "pm-secant-proto": ({**get_preset("pm-proto"), "alpha_calibration": "secant", **_LOG}, "pm-secant + prototypes"),
    "pm-branch-proto": ({**get_preset("pm-proto"), "alpha_calibration": "branch", **_LOG}, "pm-branch + prototypes"),
    "pm-curve-proto": ({**get_preset("pm-proto"), "alpha_calibration": "curve", **_LOG}, "pm-curve + prototypes"),
    "pm-validated": (
        get_preset("pm-validated"),  # the shipped, recommended preset itself
        "P&M training + the prototype head; alpha per task from an accuracy estimate on held-out training data and "
        "drift-widened class statistics (no eval data)",
    ),
    # diagnostics, not a method: pm-validated with the whole grid scanned (the same choices on every committed merge,
    # scripts/validation_scan.py) and each alpha's eval score logged beside its estimate
    "pm-validated-diag": (
        {**get_preset("pm-validated"), "merge_parameters": {"validation_log_eval": True, "validation_patience": 0}},
        "pm-validated scanning the whole grid, each alpha's eval-split score logged beside its estimate (diagnostics)",
    ),
    # pm-validated choosing the first task's alpha too (by the same one-standard-error rule on its held-out data)
    "pm-validated-first": (
        {**get_preset("pm-validated"), "merge_parameters": {"validation_first_task": True}},
        "pm-validated, the first task's alpha chosen too (the smallest its held-out data cannot tell from the best)",
    ),
    # pm-validated scanning the second merge from theta_0 too (the first merge undone where the data ask for it)
    "pm-validated-revisit": (
        {**get_preset("pm-validated"), "merge_parameters": {"validation_revisit_first": True}},
        "pm-validated, the second merge also scanned from theta_0 (the first merge undone where one error better)",
    ),
    # pm-validated with each alpha's error of its difference from the best, paired on the same held-out samples
    # pm-validated with the old classes widened by the unpredicted drift of the held-out rows (not trained on)
    "pm-validated-heldout": (
        {**get_preset("pm-validated"), "merge_parameters": {"validation_drift": "heldout"}},
        "pm-validated, the old classes widened by the drift of the task's held-out rows (not its training rows)",
    ),
    "pm-validated-paired": (
        {**get_preset("pm-validated"), "merge_parameters": {"validation_paired": True}},
        "pm-validated, each alpha within its paired error of the best (not the best's own error) can be chosen",
    ),
    # the rivals a user would pick instead (docs/baselines.md)
    "seq-proto": (
        {"merge_method": "seq-merge", **_NO_PERTURB, **_PROTO},
        "sequential LoRA (a new LoRA per task merged with alpha = 1) + the prototype head alignment",
    ),
    "slow-proto": (
        {"merge_method": "seq-merge", **_NO_PERTURB, **_PROTO, BACKBONE_LR_SCALE: 0.01},
        "slow learner (SLCA-style): backbone LoRA at 0.01 x the suite's learning rate, the head at the full rate, "
        "alpha = 1, + the prototype head alignment",
    ),
    "frozen-proto": (
        {"merge_method": "coma", "fixed_alpha": 0.0, **_NO_PERTURB, **_PROTO},
        "SimpleCIL-style (Zhou et al. 2023): the pretrained backbone kept (alpha = 0 for every task, the first too), "
        "+ the prototype head alignment",
    ),
    # PEFT's OSF and O-LoRA (docs/baselines.md): the suite's linear class head, trained on each task's classes as for
    # seq-merge (the head grows per task), no prototype alignment, no perturbation
    "osf": (
        {"merge_method": "osf", **_NO_PERTURB, BACKBONE_LR_SCALE: 0.05},
        "PEFT's OSF, one adapter continued: SVD re-taken per task, top t/T singular directions of q/v preserved, the "
        "rest trained (lr 0.05 x the suite's, the docs' 1e-5..1e-4 range; the linear head at the full rate), merged "
        "as trained",
    ),
    "olora": (
        {"merge_method": "olora", **_NO_PERTURB},
        "O-LoRA: a new LoRA per task with 0.5 sum ||A_t A_i^T||_1 against earlier tasks' A, merged with alpha = 1 "
        "(the linear head trained per task)",
    ),
}
# suite -> the method its measurements recommend, named in its summary.json (docs/results.md says why)
RECOMMENDED: dict[str, str] = {"llm-instruct-long": "merge-only-fisher-mean"}
COMPACT_KEYS = (
    "tasks",
    "accuracy_matrix",
    "til_accuracy_matrix",
    "acc",
    "aaa",
    "bwt",
    "forgetting",
    "til_acc",
    "alphas",
    "alphas_raw",
    "pre_merge_acc",
    "oracle_scores",
    "delta_norms",
    "optimizer_steps",
    "timings",
    "fisher_traces",
    "calibrations",
    "loss_increases",
    "branch_losses",
    "eval_sizes",
    "primary_metric",
    "score_matrices",
    "score_summaries",
    "peak_rss_mb",
)


def ensure_assets(suite: str, threads: int) -> None:
    """Build what a suite's config names but a fresh machine lacks: the vision-cil ViT (pretrained by the project)."""
    if not suite.startswith("vision-cil"):
        return
    from pm_hf.commands.parsing import load_yaml_config

    folder = Path(load_yaml_config(SUITES[suite])["model_name_or_path"]).expanduser()
    if folder.is_dir():
        return
    print(f"[assets] {folder} is missing: pretraining the ViT on Animal-MNIST first (~1-2 min)", flush=True)
    spec = importlib.util.spec_from_file_location("pretrain_vit", ROOT / "scripts" / "pretrain_vit_animal_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.pretrain(folder, threads=threads)


def base_weights_sha256(model: str) -> str:
    """sha256 over the weight files (*.safetensors, *.bin, *.gguf) of the run's base model folder (a Hub id resolved
    through the HF cache), so that a committed run names the exact weights it started from."""
    from pm_hf.fileio import file_digest
    from pm_hf.method.models import resolve_model_path

    folder = Path(resolve_model_path(model)).expanduser()
    if not folder.is_dir():  # a Hub id: its snapshot in the HF cache (`make install` seeds the offline ones)
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - reported as unresolved in the run's JSON
            return f"unresolved:{model}"
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")] if folder.is_dir() else []
    return file_digest(files) if files else f"unresolved:{model}"


def _resolve(values: dict, config: Path) -> dict:
    """`BACKBONE_LR_SCALE` turned into config fields against the suite's learning rate (or an override of it)."""
    values = dict(values)
    scale = values.pop(BACKBONE_LR_SCALE, None)
    if scale is not None:
        lr = float(values.get("learning_rate", yaml.safe_load(config.read_text())["learning_rate"]))
        values.update(learning_rate=lr * scale, head_learning_rate=lr)
    return values


def _overrides(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += [f"--{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]
    return out


def run_accuracy(
    config: Path,
    methods: list[str],
    seeds: list[int],
    out: Path,
    work: Path,
    extra: dict | None = None,
    method_table: dict | None = None,
) -> list[Path]:
    """Run every unfinished (method, seed) of one suite; returns the per-run JSON paths written now."""
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    table = method_table or METHODS
    written = []
    for method in methods:
        for seed in seeds:
            target = out / "runs" / method / f"seed{seed}.json"
            if target.exists():
                print(f"[skip] {method} seed {seed}: {target.relative_to(out)} exists", flush=True)
                continue
            run_dir = work / method / f"seed{seed}"
            values = {**(extra or {}), **table[method][0], "seed": seed, "output_dir": str(run_dir)}
            groups = parse_config(config, _overrides(_resolve(values, config)))
            resume = run_dir.exists()  # an interrupted run (or one killed before its first checkpoint) continues
            print(f"[run] {method} seed {seed}{' (resuming)' if resume else ''}", flush=True)
            start = time.perf_counter()
            results = run_continual(*groups, resume=resume)
            compact = {k: results.get(k) for k in COMPACT_KEYS}
            compact.update(
                method=method,
                seed=seed,
                overrides=table[method][0],
                description=table[method][1],
                config=str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
                wall_s=time.perf_counter() - start,
                base_weights_sha256=base_weights_sha256(groups[0].model_name_or_path),
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(compact, indent=1, default=float))
            os.replace(tmp, target)
            written.append(target)
            print(f"[done] {method} seed {seed}: ACC {compact['acc']:.4f} in {compact['wall_s']:.0f}s", flush=True)
    return written


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _seen_curve(run: dict) -> list[float]:
    sizes = run["eval_sizes"]
    return [seen_accuracy(row[: t + 1], sizes[: t + 1]) for t, row in enumerate(run["accuracy_matrix"])]


def recommendation(suite: str, out: Path) -> str | None:
    """The suite's recommended method (`RECOMMENDED`) where `out` holds runs of it, else None: a folder with other
    methods' runs only (one method and seed per process, `--out` apart) is summarized without naming it."""
    named = RECOMMENDED.get(suite)
    return named if named is not None and any((out / "runs" / named).glob("seed*.json")) else None


def summarize_accuracy(out: Path, order: list[str] | None = None, recommended: str | None = None) -> dict:
    """Aggregate every finished run under `out/runs` into summary.json, table.md and curves.png; summary.json also
    names the suite's `recommended` method (`RECOMMENDED`), which must have runs. Returns the methods' rows."""
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "runs").glob("*/seed*.json")):
        run = json.loads(path.read_text())
        runs.setdefault(run["method"], []).append(run)
    names = [m for m in (order or METHODS) if m in runs] + sorted(set(runs) - set(order or METHODS))
    summary = {}
    for m in names:
        rs = runs[m]
        row = {"seeds": sorted(r["seed"] for r in rs), "description": rs[0]["description"]}
        single = len(rs[0]["accuracy_matrix"]) == 1  # joint: one task, no per-task trajectory
        for key in ("acc", "aaa", "bwt", "forgetting", "til_acc"):
            mean, std = _mean_std([r.get(key) for r in rs])
            row[key] = None if (single and key in ("aaa", "bwt", "forgetting")) else {"mean": mean, "std": std}
        T = max(len(r["alphas"]) for r in rs)
        row["alphas"] = [_mean_std([r["alphas"][t] for r in rs if len(r["alphas"]) > t])[0] for t in range(T)]
        row["curve"] = [_mean_std([_seen_curve(r)[t] for r in rs if len(r["alphas"]) > t])[0] for t in range(T)]
        # seconds of the run's own work (train, Fisher, merge, eval per task): robust to resumed runs
        row["wall_s"] = _mean_std([sum(sum(t.values()) for t in r["timings"]) for r in rs])[0]
        row["align_over_train"] = _mean_std(
            [sum(t.get("head_align", 0.0) for t in r["timings"]) / sum(t["train"] for t in r["timings"]) for r in rs]
        )[0]
        summary[m] = row
    if recommended is not None and recommended not in summary:
        raise ValueError(f"the recommended method {recommended!r} has no runs under {out / 'runs'}")
    out.mkdir(parents=True, exist_ok=True)
    named = {} if recommended is None else {"recommended": recommended}
    (out / "summary.json").write_text(json.dumps({**summary, **named}, indent=1))

    def cell(v):
        return "—" if v is None or not math.isfinite(v["mean"]) else f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"

    lines = [
        "| method | ACC | AAA | BWT | forgetting | within-task ACC | α per task (mean) | seeds | s/run "
        "| head align / train |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, row in summary.items():
        alphas = ", ".join(f"{a:.2f}" for a in row["alphas"])
        align = f"{100 * row['align_over_train']:.0f}%" if row["align_over_train"] > 0 else "—"
        lines.append(
            f"| {m} | {cell(row['acc'])} | {cell(row['aaa'])} | {cell(row['bwt'])} | {cell(row['forgetting'])} | "
            f"{cell(row['til_acc'])} | {alphas} | {len(row['seeds'])} | {row['wall_s']:.0f} | {align} |"
        )
    metric_names = [n for n in (runs[names[0]][0].get("score_summaries") or {}) if n not in ("accuracy",)]
    if names and runs[names[0]][0].get("primary_metric") not in (None, "accuracy"):
        lines += ["", "| method | " + " | ".join(f"{n}: final / BWT / forgetting" for n in metric_names) + " |"]
        lines.append("|---|" + "---|" * len(metric_names))
        for m in names:
            cells = []
            for n in metric_names:
                vals = {
                    k: _mean_std([r["score_summaries"][n][k] for r in runs[m]])[0]
                    for k in ("final", "bwt", "forgetting")
                }
                cells.append(f"{vals['final']:.3f} / {vals['bwt']:+.3f} / {vals['forgetting']:.3f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        peak = {m: _mean_std([r.get("peak_rss_mb") for r in runs[m]])[0] for m in names}
        lines += ["", "peak RSS (MB): " + ", ".join(f"{m} {v:.0f}" for m, v in peak.items())]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    curves = {m: [100 * v for v in row["curve"]] for m, row in summary.items()}
    plot_method_curves(curves, out / "curves.png", f"{out.name}: mean over seeds", "accuracy over all seen classes (%)")
    return summary


RESULTS_DOC = ROOT / "docs" / "results.md"


def update_results_doc(suite: str, out: Path, doc: Path = RESULTS_DOC) -> bool:
    """Replace the block of `doc` between `<!-- results:<suite> -->` and `<!-- /results:<suite> -->` by table.md
    (the writer of scripts/doc_figures.py, which also writes every other figure of the docs from results/)."""
    spec = importlib.util.spec_from_file_location("doc_figures", Path(__file__).resolve().parent / "doc_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    table = (out / "table.md").read_text(encoding="utf-8").strip()
    return figures.write_block(doc, f"<!-- results:{suite} -->", f"<!-- /results:{suite} -->", table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["cost", *SUITES], help="which benchmark suite to run")
    parser.add_argument(
        "--quick", action="store_true", help="cost: fewer steps and rounds (about 6 min on 2 CPU cores)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: results/<suite>)")
    parser.add_argument("--methods", nargs="+", default=None, help=f"accuracy suites: subset of {list(METHODS)}")
    parser.add_argument("--seeds", type=int, default=3, help="accuracy suites: seeds 0..N-1")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="accuracy suites: start at this seed (split a grid over processes)"
    )
    parser.add_argument("--work", default=None, help="run folders (default: outputs/bench/<suite>)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild table/plot from finished runs")
    parser.add_argument(
        "--docs", "--readme", dest="docs", action="store_true", help="also write the table into docs/results.md"
    )
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch threads (1 when sharing 2 cores with another job)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(args.out or ROOT / "results" / args.suite)
    if args.suite in SUITES:
        methods = args.methods or list(METHODS)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
        if not args.summary_only:
            ensure_assets(args.suite, args.threads)
            work = Path(args.work or ROOT / "outputs" / "bench" / args.suite)
            run_accuracy(
                SUITES[args.suite], methods, list(range(args.first_seed, args.seeds)), out, work, {"disable_tqdm": True}
            )
        summary = summarize_accuracy(out, recommended=recommendation(args.suite, out))
        if args.docs and not update_results_doc(args.suite, out):
            print(f"{RESULTS_DOC.relative_to(ROOT)} has no <!-- results:{args.suite} --> block; not updated")
        print((out / "table.md").read_text())
        print(json.dumps({m: round(r["acc"]["mean"], 4) for m, r in summary.items()}))
        return
    start = time.perf_counter()
    figures, raw = run_cost(args.quick)
    raw["wall_s"] = time.perf_counter() - start
    write_reports(Path(args.out or ROOT / "results" / args.suite), figures, raw)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
