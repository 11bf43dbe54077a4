"""Where the `pm` merge's time goes, on the cost suite's model (all-MiniLM-L6-v2, LoRA r=8 on query/value, the
classifier trained) after real epochs, as `results/cost/` times it (task vector + alpha + merge), part by part; and
whether the cheaper fused forms of its arithmetic would keep its bits.

    python scripts/merge_profile.py [--rounds 6] [--samples 300] [--gc-off] [--merge-threads 1]

Each round trains one PM epoch of `--samples` samples (the cost suite's task, 300; the profiles of stops 38-43 in
docs/results.md ran 96, the quick suite's task until then), takes the per-sample Fisher, then merges with one `pm`
strategy kept across rounds (round 0 is its first merge: S = G = 0, the base weights' first write). The parts are
timed by wrapping the functions the merge calls (the wrappers add a few microseconds each). `--gc-off` holds
Python's garbage collector off inside the timed merge, to show how much of a round's spread is a collection landing
in it. The page faults column counts the process's minor faults inside the timed merge (memory touched for the first
time: fresh allocations, the first write into the loaded weights). `--merge-threads N` runs the timed merge alone
with N intra-op threads (training and the Fisher keep the suite's), to show whether its time is per-call overhead or
passes over memory.

The bits check takes the last round's real tensors (Delta, F, S, G, the weight) and compares the arithmetic the merge
does with one fused op in its place: `addcmul_` for G's update, `torch.add(..., alpha=)` for the weight, `addmm` with
`alpha=` for s B A, and the closed form's float64 sums with one intra-op thread instead of two."""

from __future__ import annotations

import argparse
import functools
import gc
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from transformers import DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_suites import cost  # noqa: E402

from pm_hf.config.groups import FisherArguments, MergeArguments  # noqa: E402
from pm_hf.method import merge as merge_math  # noqa: E402
from pm_hf.method import weights as weights_module  # noqa: E402
from pm_hf.method.strategies import alpha as alpha_module  # noqa: E402
from pm_hf.method.strategies import base as strategy_base  # noqa: E402
from pm_hf.method.strategies import build_strategy  # noqa: E402

PARTS = [  # (owner, attribute, label): what the timed merge calls, in order
    (weights_module, "lora_task_vector", "task vector: s B A per layer"),
    (weights_module.ModelWeights, "trained_params", "task vector: trained parameters' walk"),
    (weights_module, "adapter_factors", "task vector: the adapter's factors"),
    (alpha_module, "alpha_terms_by_key", "alpha: float64 sums"),
    (alpha_module, "accumulator_updates", "S, G update"),
    (weights_module.ModelWeights, "targets", "apply: the weights' walk"),
    (weights_module.ModelWeights, "_surely_finite", "apply: finiteness bound"),
    (weights_module.ModelWeights, "_add_into", "apply: write"),
    (strategy_base, "zero_adapter", "adapter zeroed"),
]


def wrap_parts(seconds: dict[str, float]) -> None:
    for owner, name, label in PARTS:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def timed(*args, _inner=inner, _label=label, **kw):
            start = time.perf_counter()
            out = _inner(*args, **kw)
            out = list(out) if hasattr(out, "__next__") else out  # a generator's work is done when consumed
            seconds[_label] += time.perf_counter() - start
            return out

        setattr(owner, name, timed)


def bits_check(vector, fisher, S, G, weights, alpha: float) -> dict[str, bool]:
    """Whether each fused form gives the merge's bits on these tensors, every adapted layer (True: the same bits)."""
    same = dict.fromkeys(("G update: addcmul_", "weight: add(alpha=)", "s B A: addmm(alpha=)"), True)
    tensors = weights.tensors()
    for key, factors in vector.adapter.items():
        d, f, s, g, w = vector.deltas[key], fisher[key], S[key], G[key], tensors[key].detach()
        g_merge = g.clone().add_(torch.mul(s, alpha).mul_(d)).add_(torch.mul(f, alpha - 1.0).mul_(d))
        g_fused = g.clone().addcmul_(s, d, value=alpha).addcmul_(f, d, value=alpha - 1.0)
        same["G update: addcmul_"] &= torch.equal(g_merge, g_fused)
        same["weight: add(alpha=)"] &= torch.equal(torch.add(w, torch.mul(d, alpha)), torch.add(w, d, alpha=alpha))
        A, B = factors.A.float(), factors.B.float()
        fused = torch.addmm(torch.zeros(B.shape[0], A.shape[1]), B, A, beta=0, alpha=factors.scaling)
        same["s B A: addmm(alpha=)"] &= torch.equal((B @ A).mul_(factors.scaling), fused)
    two = merge_math.alpha_terms(vector.deltas, fisher, S, G)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    same["alpha sums: 1 thread"] = merge_math.alpha_terms(vector.deltas, fisher, S, G) == two
    torch.set_num_threads(threads)
    return same


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--samples", type=int, default=cost.TASK_SAMPLES, help="training samples of each round's epoch")
    parser.add_argument("--gc-off", action="store_true", help="no garbage collection inside the timed merge")
    parser.add_argument("--merge-threads", type=int, default=0, help="intra-op threads of the timed merge (0: as set)")
    args = parser.parse_args(argv)
    torch.set_num_threads(cost.THREADS)
    transformers.logging.set_verbosity_error()
    seconds: dict[str, float] = defaultdict(float)
    wrap_parts(seconds)
    tmp = Path(tempfile.mkdtemp(prefix="pm_hf_merge_profile_"))
    model, tok, name = cost.load_lora_model(tmp)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data, collate = cost.text_dataset(tok, args.samples, seed=1), DataCollatorWithPadding(tok)
    weights, strategy = cost.ModelWeights(model), build_strategy(MergeArguments(merge_method="pm"))
    keys = list(cost.lora_layers(model)) + list(cost.full_trainable_params(model))
    rows = []
    for r in range(args.rounds):
        cost.restore(model, init)
        before = {k: p.detach().float().clone() for k, p in weights.trained_params().items()}
        epoch = cost.train(model, init, True, data, collate, tmp, num_train_epochs=1)
        fargs = FisherArguments(fisher_mode="per_sample", fisher_batch_size=16)
        fisher = cost.estimate_fisher(model, data, collate, fargs, keys=keys, show_progress=False)
        S, G = ({k: v.clone() for k, v in acc.items()} for acc in (strategy.S, strategy.G))  # before this merge
        seconds.clear()
        if args.gc_off:
            gc.collect()
            gc.disable()
        if args.merge_threads:
            torch.set_num_threads(args.merge_threads)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        vector = weights.task_vector(before)
        plan = cost.merge_task(weights, strategy, r, vector, before, fisher)
        cost.task_record(vector.adapter, plan.alpha)
        total = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        torch.set_num_threads(cost.THREADS)
        gc.enable()
        rows.append({"round": r, "epoch": epoch.end - epoch.begin, "merge": total, "faults": faults, **seconds})
    merge_threads = args.merge_threads or torch.get_num_threads()
    print(
        f"# {name}, {torch.get_num_threads()} threads ({merge_threads} in the merge), garbage collection "
        f"{'off' if args.gc_off else 'on'}\n"
    )
    labels = [label for *_, label in PARTS]
    print("| round | epoch s | merge ms | merge / epoch | page faults | " + " | ".join(labels) + " |")
    print("|---" * (5 + len(labels)) + "|")
    for row in rows:
        parts = " | ".join(f"{1000 * row.get(label, 0.0):.2f}" for label in labels)
        ratio = row["merge"] / row["epoch"]
        head = f"| {row['round']} | {row['epoch']:.3f} | {1000 * row['merge']:.1f} | {ratio:.4f} | {row['faults']}"
        print(f"{head} | {parts} |")
    later = [row["merge"] / row["epoch"] for row in rows[1:]]
    print(f"\nmedian merge / epoch, rounds 1-{len(rows) - 1}: {statistics.median(later):.4f}")
    if S and vector.adapter:  # S, G as the last merge found them (not zero from round 1 on)
        alpha = float(next(iter(plan.alpha.values())))
        print(f"\nthe merge's bits kept by a fused form (last round's tensors, alpha {alpha:.4f}):")
        for form, same in bits_check(vector, fisher, S, G, weights, alpha).items():
            print(f"- {form}: {'same bits' if same else 'different bits'}")


if __name__ == "__main__":
    main()
