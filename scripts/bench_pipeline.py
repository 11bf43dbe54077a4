"""The cost of the whole pipeline (part of `python scripts/benchmark.py cost`): the demo config
(`configs/demo_text_cil.yaml`, the recommended preset) against `seq-merge` at the same epochs, side by side in one
process, alternating; the total task seconds compared include training, the Fisher, the merge, the head alignment
and the evaluation of every seen task. In the preset's runs, every task's alpha is also computed from Fishers with
smaller sample caps (the model at theta*_t, the same S and G) to find the smallest cap that keeps alpha within 0.01
of the full-data alpha, and what that cap saves."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from pm_hf.config import FisherArguments
from pm_hf.continual import build_loop
from pm_hf.fisher import estimate_fisher, normalize_fisher
from pm_hf.merge import alpha_terms, select_alpha
from pm_hf.parsing import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo_text_cil.yaml"
CAPS = (16, 32, 64, 128)
SEQ_MERGE = {"merge_method": "seq-merge", "perturbation": "none", "head_align": "none"}


class CapProbe:
    """Wraps the strategy's `merge`: before the full-data merge, the alpha each smaller Fisher cap would give."""

    def __init__(self, loop, caps):
        self.loop, self.caps, self.rows = loop, caps, []
        self.merge, loop.strategy.merge = loop.strategy.merge, self

    def __call__(self, t, vector, fisher=None, score=None, **kw):
        loop, strategy, deltas = self.loop, self.loop.strategy, vector.deltas
        S = {k: strategy.S.get(k, 0 * d) for k, d in deltas.items()}
        G = {k: strategy.G.get(k, 0 * d) for k, d in deltas.items()}
        row = {"full": select_alpha(alpha_terms(deltas, fisher, S, G)).alpha, "caps": {}, "seconds": {}}
        task = loop.stream.tasks[t]
        for cap in self.caps:
            start = time.perf_counter()
            args = FisherArguments(**{**vars(loop.fisher_args), "fisher_max_samples": cap})
            f = estimate_fisher(loop.model, task.train, loop.stream.collate_fn, args, keys=list(deltas), seed=t)
            f = normalize_fisher(f, args.fisher_normalize)
            row["seconds"][cap] = time.perf_counter() - start
            row["caps"][cap] = select_alpha(alpha_terms(deltas, f, S, G)).alpha
        self.rows.append(row)
        return self.merge(t, vector, fisher=fisher, score=score, **kw)


def _run(overrides: dict, out: Path, probe: bool):
    values = {**overrides, "output_dir": str(out), "disable_tqdm": True}
    flags = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    loop = build_loop(*parse_config(DEMO, flags))
    caps = CapProbe(loop, CAPS) if probe else None
    results = loop.run()
    total = sum(sum(t.values()) for t in results["timings"])
    if caps:  # the probe's own Fisher passes ran inside the merge timer: not the preset's cost
        total -= sum(sum(row["seconds"].values()) for row in caps.rows)
    return total, results, caps.rows if caps else None


def pipeline_cost(tmp: Path, rounds: int, samples: int) -> dict:
    """Median total task seconds of the preset and of seq-merge (alternating rounds), their ratio, and the Fisher cap
    table of the preset's first round."""
    base = {"max_train_samples_per_class": samples, "max_eval_samples_per_class": min(50, samples)}
    times: dict[str, list[float]] = {"preset": [], "seq-merge": []}
    caps, parts = None, {}
    for r in range(rounds):
        for name in ("preset", "seq-merge") if r % 2 == 0 else ("seq-merge", "preset"):
            overrides = base if name == "preset" else {**base, **SEQ_MERGE}
            total, results, rows = _run(overrides, tmp / f"{name}{r}", probe=name == "preset" and caps is None)
            times[name].append(total)
            caps = rows if rows is not None else caps
            parts[name] = {k: sum(t.get(k, 0.0) for t in results["timings"]) for k in results["timings"][0]}
    full_n = 2 * samples
    table = {cap: max(abs(row["caps"][cap] - row["full"]) for row in caps[1:]) for cap in CAPS}  # task 1: alpha = 1
    within = [cap for cap in CAPS if table[cap] <= 0.01]
    preset, seq = statistics.median(times["preset"]), statistics.median(times["seq-merge"])
    return {
        "preset_over_seq_merge": preset / seq,
        "seconds": times,
        "seconds_by_part": parts,
        "fisher_cap_max_alpha_error": table,
        "fisher_cap_seconds": {cap: statistics.fmean(row["seconds"][cap] for row in caps) for cap in CAPS},
        "fisher_full_samples": full_n,
        "smallest_cap_within_0.01": min(within) if within else None,
        "alphas": caps,
    }
