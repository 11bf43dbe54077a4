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
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: its bench_suites package
from bench_suites.cost import THREADS, run_cost, write_reports
from bench_suites.methods import BACKBONE_LR_SCALE, METHODS, RECOMMENDED, SUITES

from pm_hf.run.metrics import plot_method_curves, seen_accuracy

ROOT = Path(__file__).resolve().parent.parent

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
        "--quick", action="store_true", help="cost: fewer steps and rounds (about 3.5 min on 2 CPU cores)"
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
