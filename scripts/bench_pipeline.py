"""The cost of the whole pipeline (part of `python scripts/benchmark.py cost`): the demo config
(`configs/demo_text_cil.yaml`, the recommended preset) against `seq-merge` at the same epochs, side by side in one
process, alternating; the total task seconds compared include training, the Fisher, the merge, the head alignment
and the evaluation of every seen task. Then the preset is run end to end with smaller Fisher sample caps
(`fisher_max_samples`), and each run's alpha per task is compared with the full-data run's, to find the smallest
cap that keeps every alpha within 0.01 and what that cap saves (the error of a cap propagates to later tasks through
S and G, so the whole sequence is rerun, not one task's alpha); a preset that takes no Fisher has no cap to study."""

from __future__ import annotations

import statistics
from pathlib import Path

from pm_hf.commands.parsing import parse_config
from pm_hf.config.groups import RunConfig
from pm_hf.continual import build_loop

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo_text_cil.yaml"
CAPS = (16, 32, 64, 128)
SEQ_MERGE = {"merge_method": "seq-merge", "perturbation": "none", "head_align": "none"}


def _run(overrides: dict, out: Path) -> tuple[float, dict]:
    values = {**overrides, "output_dir": str(out), "disable_tqdm": True}
    flags = [x for k, v in values.items() for x in (f"--{k}", str(v))]
    results = build_loop(RunConfig(*parse_config(DEMO, flags))).run()
    return sum(sum(t.values()) for t in results["timings"]), results


def _fisher_seconds(results: dict) -> float:
    return sum(t.get("fisher", 0.0) for t in results["timings"])


def pipeline_cost(tmp: Path, rounds: int, samples: int) -> dict:
    """Median total task seconds of the preset and of seq-merge (alternating rounds), their ratio, and the Fisher cap
    table: per cap below the task's training size, the largest |alpha - full-data alpha| over the tasks."""
    base = {"max_train_samples_per_class": samples, "max_eval_samples_per_class": min(50, samples)}
    times: dict[str, list[float]] = {"preset": [], "seq-merge": []}
    parts, full = {}, None
    for r in range(rounds):
        for name in ("preset", "seq-merge") if r % 2 == 0 else ("seq-merge", "preset"):
            overrides = base if name == "preset" else {**base, **SEQ_MERGE}
            total, results = _run(overrides, tmp / f"{name}{r}")
            times[name].append(total)
            full = results if name == "preset" and full is None else full
            parts[name] = {k: sum(t.get(k, 0.0) for t in results["timings"]) for k in results["timings"][0]}
    trained = 2 * samples  # the demo's tasks have 2 classes; the Fisher of the full run takes all of them
    errors, seconds, alphas = {}, {}, {"full": full["alphas"]}
    caps = [c for c in CAPS if c < trained] if _fisher_seconds(full) > 0 else []  # a preset with no Fisher: no cap
    for cap in caps:
        _, results = _run({**base, "fisher_max_samples": cap}, tmp / f"cap{cap}")
        alphas[cap] = results["alphas"]
        errors[cap] = max(abs(a - b) for a, b in zip(results["alphas"], full["alphas"]))
        seconds[cap] = _fisher_seconds(results)
    within = [cap for cap, err in errors.items() if err <= 0.01]
    preset, seq = statistics.median(times["preset"]), statistics.median(times["seq-merge"])
    return {
        "preset_over_seq_merge": preset / seq,
        "ratios_per_round": [p / q for p, q in zip(times["preset"], times["seq-merge"])],  # the spread
        "seconds": times,
        "seconds_by_part": parts,
        "fisher_cap_max_alpha_error": errors,
        "fisher_cap_fisher_seconds": seconds,
        "fisher_full_fisher_seconds": _fisher_seconds(full),
        "fisher_full_samples": trained,
        "smallest_cap_within_0.01": min(within) if within else None,
        "alphas": alphas,
    }
