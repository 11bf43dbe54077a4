"""The LLM track's length test (issue 24, item 3): does P&M's extra forgetting on `llm-instruct-long` come from the
length of the task vectors its merges add (they grow with eps, docs/results.md) or from their direction?

From two finished runs of one seed, a `pm` run and a `merge-only` run (the same training but for the perturbation),
the merged models are rebuilt from the runs' own adapter records (`adapters/task_<t>.safetensors`: each task's
trained LoRA factors and its alpha) as theta_0 + sum_{k<=t} alpha_k c_k tau_k, and after each merge t the response-
token eval loss of every seen task is measured (the eval-loss matrix of the runs). Four variants:

    pm                         c_k = 1: the run as it ran (its matrix must equal the run's own: checked)
    merge-only                 c_k = 1 (checked the same way)
    pm at merge-only's length  c_k = ||tau_k^mo|| / ||tau_k^pm||: pm's directions and alphas, merge-only's lengths
    merge-only at pm's length  c_k = ||tau_k^pm|| / ||tau_k^mo||

If the length causes the forgetting, the first rescaled variant forgets like merge-only and the second like pm; if the
direction does, each forgets like its own run. The rescaled variants leave the runs' trajectories: task k's adapter
was trained from its own run's merged model, here merged onto a model rescaled before it. Runs nothing but the
evaluation (about 10 eval-loss passes per variant); writes one JSON per seed.

    python scripts/llm_length_test.py --pm RUN_DIR --reference RUN_DIR \
        --out results/llm-instruct-long/length_test/seed1.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
Tensors = Mapping[str, torch.Tensor]


def dense_vector(record) -> dict[str, torch.Tensor]:
    """tau_k = s B A of every adapted weight (in the base weight's layout) of one task's adapter record."""
    from pm_hf.method.merge import LoraFactors

    return {
        key: LoraFactors(A, record.B[key], record.scaling[key], record.fan_in_fan_out).delta()
        for key, A in record.A.items()
    }


def vector_norm(tau: Tensors) -> float:
    """||tau||_F over all its weights (the runs' `delta_norms`)."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in tau.values()))


def cosine(a: Tensors, b: Tensors) -> float:
    """cos(a, b) over all weights: how alike two task vectors' directions are."""
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    return dot / (vector_norm(a) * vector_norm(b))


def length_scales(own: Sequence[float], target: Sequence[float]) -> list[float]:
    """c_k = target_k / own_k: the factor that gives task k's vector the target length."""
    return [t / o for o, t in zip(own, target, strict=True)]


def merged_delta(taus: Sequence[Tensors], alphas: Sequence[Mapping[str, float]], scales: Sequence[float],
                 upto: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """sum_{k<=upto} alpha_k c_k tau_k, key by key (alpha per key, as the records hold it)."""
    total: dict[str, torch.Tensor] = {}
    for k in range(upto + 1):
        for key, v in taus[k].items():
            term = alphas[k][key] * scales[k] * v
            total[key] = total[key] + term if key in total else term
    return total


def loss_matrix(apply: Callable[[int], None], losses: Callable[[int], float], tasks: int) -> list[list[float | None]]:
    """R[t][j]: the eval loss of task j <= t after merge t (None above the diagonal); `apply(t)` sets the weights."""
    rows = []
    for t in range(tasks):
        apply(t)
        rows.append([losses(j) if j <= t else None for j in range(tasks)])
    return rows


def seed_of(run: dict) -> int:
    return run["config"]["PMConfig"]["seed"]


def run_records(run_dir: Path) -> tuple[list, dict]:
    from pm_hf.hub.export import load_task_records

    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    return load_task_records(run_dir, len(results["tasks"])), results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pm", required=True, type=Path, help="run folder of the pm run (results.json, adapters/)")
    p.add_argument("--reference", required=True, type=Path, help="run folder of the merge-only run of the same seed")
    p.add_argument("--config", default=str(ROOT / "configs" / "llm_wordnet_long.yaml"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from pm_hf.commands.parsing import parse_config
    from pm_hf.method.models import load_causal_lm, load_processor
    from pm_hf.run.assembly import config_stream
    from pm_hf.run.evaluation import instruction_eval_loss
    from pm_hf.run.results import score_summary

    (pm_records, pm_run), (ref_records, ref_run) = run_records(a.pm), run_records(a.reference)
    if seed_of(pm_run) != seed_of(ref_run):
        raise SystemExit("the two runs must share their seed")
    model_args, data_args, args, *_ = parse_config(a.config, ["--seed", str(seed_of(pm_run))])
    tokenizer, model = load_processor(model_args), load_causal_lm(model_args)
    stream = config_stream(True, data_args, tokenizer, args, model_args.model_name_or_path)
    from pm_hf.run.assembly import task_fingerprint

    for run in (pm_run, ref_run):  # the eval data the runs scored
        if run["config"]["fingerprints"]["tasks"] != [task_fingerprint(t) for t in stream.tasks]:
            raise SystemExit(f"{a.config} does not build the tasks the run {run['output_dir']} scored")
    model.eval()
    params = dict(model.named_parameters())
    taus = {"pm": [dense_vector(r) for r in pm_records], "merge-only": [dense_vector(r) for r in ref_records]}
    alphas = {"pm": [r.alpha for r in pm_records], "merge-only": [r.alpha for r in ref_records]}
    base = {key: params[key].detach().clone() for key in taus["pm"][0]}
    norms = {name: [vector_norm(t) for t in ts] for name, ts in taus.items()}
    cosines = [cosine(p, r) for p, r in zip(taus["pm"], taus["merge-only"], strict=True)]
    variants = {
        "pm": ("pm", [1.0] * len(pm_records)),
        "merge-only": ("merge-only", [1.0] * len(ref_records)),
        "pm at merge-only's length": ("pm", length_scales(norms["pm"], norms["merge-only"])),
        "merge-only at pm's length": ("merge-only", length_scales(norms["merge-only"], norms["pm"])),
    }
    tasks, sizes = len(pm_records), [len(t.eval) for t in stream.tasks]
    out = {"seed": seed_of(pm_run), "runs": {"pm": str(a.pm), "merge-only": str(a.reference)},
           "norms": norms, "cosines": cosines, "variants": {}}  # fmt: skip
    for name, (source, scales) in variants.items():

        def apply(t, source=source, scales=scales):
            delta = merged_delta(taus[source], alphas[source], scales, t)
            with torch.no_grad():
                for key, value in base.items():
                    params[key].copy_(value + delta[key].to(value.dtype))

        def losses(j):
            return instruction_eval_loss(
                model, stream.tasks[j].eval, stream.collate_fn, args.per_device_eval_batch_size
            )

        R = loss_matrix(apply, losses, tasks)
        task_alphas = [next(iter(al.values())) for al in alphas[source]]
        out["variants"][name] = {
            "source": source,
            "scales": scales,
            "alphas": task_alphas,
            "lengths": [n * c for n, c in zip(norms[source], scales, strict=True)],
            "merge_length": sum(
                al * n * c for al, n, c in zip(task_alphas[1:], norms[source][1:], scales[1:], strict=True)
            ),
            "eval_loss": R,
            "summary": score_summary("eval_loss", R, sizes),
        }
        print(name, json.dumps(out["variants"][name]["summary"]), flush=True)
    for name, run in (("pm", pm_run), ("merge-only", ref_run)):
        own, rebuilt = run["score_matrices"]["eval_loss"], out["variants"][name]["eval_loss"]
        gap = max(abs(x - y) for r1, r2 in zip(own, rebuilt) for x, y in zip(r1, r2) if x is not None)
        out.setdefault("rebuild_max_abs_diff", {})[name] = gap
        print(f"{name}: rebuilt eval losses within {gap:.2e} nats of the run's own", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
