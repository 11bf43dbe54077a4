"""The continual loop: for each task, fresh adapter -> PMTrainer.train() -> Fisher -> alpha -> merge -> evaluate all
seen tasks -> checkpoint. Reads like METHOD.md; the math lives in `merge`, the PEFT plumbing in `adapters`.

Score convention: R[t][j] = accuracy on task j after task t, over all classes seen so far (class-incremental) or the
whole label set (domain-incremental); `R_til` is the within-task (task-incremental) accuracy next to it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import set_seed

from . import metrics
from .adapters import (
    MergedWeights,
    adapter_disabled,
    adapter_state,
    attach_lora,
    dense_record,
    detect_target_modules,
    export_merged_adapter,
    full_trainable_params,
    load_adapter_state,
    lora_layers,
    lora_task_vector,
    record_task,
    reset_adapter,
    task_vector_norm,
    zero_adapter,
)
from .checkpoint import (
    ContinualState,
    atomic_write_text,
    config_dict,
    dataclasses_from_config,
    load_checkpoint,
    load_task_records,
    save_checkpoint,
    save_task_record,
)
from .config import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig
from .data import Task, TaskStream, build_task_stream
from .fisher import estimate_fisher, normalize_fisher
from .instruct import (
    MODALITY,
    REFERENCE_COLUMN,
    build_instruction_stream,
    generate_responses,
    instruction_eval_loss,
    score_generations,
)
from .merge import AlphaChoice, MergeContext, alpha_terms, get_merge_rule, update_accumulators, zeros_like_dict
from .models import (
    ClassMask,
    compensate_drift,
    find_head,
    fit_head_rows,
    is_causal_lm,
    load_causal_lm,
    load_model,
    load_processor,
    sample_class_features,
    update_class_stats,
)
from .trainer import PMTrainer

logger = logging.getLogger(__name__)
TaskCallback = Callable[[int, dict], None]  # (task index, that task's log entry) -> None


@dataclass
class Run:
    """Everything the per-task steps share."""

    model: torch.nn.Module
    stream: TaskStream
    mask: ClassMask | None  # None for causal LMs (no class head)
    head_name: str | None
    args: PMConfig
    fisher_args: FisherArguments
    merge_args: MergeArguments
    data_args: DataArguments
    model_args: ModelArguments
    lora_args: LoraArguments
    out: Path
    merged: MergedWeights
    theta0: dict[str, torch.Tensor] | None = None  # pretrained values of merged keys (rules not starting "merged")
    tokenizer: object | None = None  # causal LMs: for generation

    @property
    def is_lm(self) -> bool:
        return self.stream.modality == MODALITY

    @property
    def primary(self) -> str:
        return self.model_args.primary_metric if self.is_lm else "accuracy"

    def set_mask(self, classes) -> None:
        if self.mask is not None:
            self.mask.set_active(classes)


def _task_args(args: PMConfig, out: Path, t: int) -> PMConfig:
    task_args = copy.deepcopy(args)
    task_args.output_dir = str(out / "tasks" / f"task_{t}")
    task_args.save_strategy = "no"
    task_args.eval_strategy = "no"
    return task_args


def _accuracy(trainer: PMTrainer, run: Run, dataset, classes) -> float:
    run.set_mask(classes)
    logits = trainer.predict(dataset).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    labels = np.asarray(dataset["labels"])
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def _eval_classes(run: Run, t: int) -> list[int]:
    """Classes predicted over after task t: all seen (class/domain-incremental)."""
    return sorted({c for task in run.stream.tasks[: t + 1] for c in task.classes})


def _head_rows(run: Run, param_key: str) -> bool:
    return run.head_name is not None and param_key.startswith(run.head_name + ".")


def _lm_scores(run: Run, dataset) -> dict[str, float]:
    """Generation scores (exact match, ROUGE-L) and the response-token eval loss of one task's eval split."""
    batch = run.args.per_device_eval_batch_size
    predictions = generate_responses(
        run.model, run.tokenizer, dataset, batch_size=batch, max_new_tokens=run.model_args.max_new_tokens
    )
    scores = score_generations(predictions, dataset[REFERENCE_COLUMN])
    scores["eval_loss"] = instruction_eval_loss(run.model, dataset, run.stream.collate_fn, batch_size=batch)
    return scores


def _scores(trainer: PMTrainer, run: Run, j: int, t: int) -> dict[str, float]:
    """Every score of task j's eval split after task t: classifiers 'accuracy' (all seen classes) and
    'til_accuracy' (within the task); causal LMs 'rougeL', 'exact_match' and 'eval_loss'."""
    task = run.stream.tasks[j]
    if run.is_lm:
        return _lm_scores(run, task.eval)
    return {
        "accuracy": _accuracy(trainer, run, task.eval, _eval_classes(run, t)),
        "til_accuracy": _accuracy(trainer, run, task.eval, task.classes),
    }


def _full_deltas(run: Run, before: dict, task: Task, seen_before: set[int]) -> dict[str, torch.Tensor]:
    """Delta of fully trained parameters; head rows only where a class was seen before AND trained now (DIL)."""
    merged_rows = sorted(set(task.classes) & seen_before)
    deltas = {}
    for key, param in full_trainable_params(run.model).items():
        delta = param.detach().float() - before[key]
        if _head_rows(run, key):
            if not merged_rows:
                continue  # class-/task-incremental: new rows are taken as trained, old rows are untouched
            keep = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)
            keep[merged_rows] = True
            delta = delta * keep.view(-1, *([1] * (delta.dim() - 1)))
        deltas[key] = delta
    return deltas


def _fix_head(run: Run, before: dict, task: Task, seen_before: set[int]) -> None:
    """New classes' rows keep their trained values; rows of classes not in this task are restored exactly."""
    untouched = [c for c in range(run.stream.num_classes) if c not in task.classes]
    with torch.no_grad():
        for key, param in full_trainable_params(run.model).items():
            if _head_rows(run, key) and untouched:
                param[untouched] = before[key][untouched].to(param.dtype)


def _seen_accuracy(trainer: PMTrainer, run: Run, t: int) -> float:
    """Sample-weighted accuracy over the eval sets of tasks 0..t, predicting over all seen classes (ACC after t)."""
    if run.is_lm:
        accs = [_lm_scores(run, run.stream.tasks[j].eval)[run.primary] for j in range(t + 1)]
    else:
        seen = _eval_classes(run, t)
        accs = [_accuracy(trainer, run, run.stream.tasks[j].eval, seen) for j in range(t + 1)]
    sizes = np.asarray([len(run.stream.tasks[j].eval) for j in range(t + 1)], dtype=float)
    return float(np.dot(accs, sizes) / sizes.sum())


def _oracle_score(run: Run, trainer: PMTrainer, t: int, lora_deltas: dict, full_deltas: dict, before: dict):
    """score(alpha): held-out accuracy on all seen tasks of theta_hat_{t-1} + alpha * Delta (the adapter off)."""
    layers = lora_layers(run.model)
    lora_start = {
        k: run.merged.master.get(k, layers[k].get_base_layer().weight.detach()).float().clone() for k in lora_deltas
    }

    def score(a: float) -> float:
        alpha = {k: a for k in (*lora_deltas, *full_deltas)}
        run.merged.apply(run.model, lora_start, lora_deltas, alpha)
        run.merged.apply(run.model, before, full_deltas, alpha)
        try:
            with adapter_disabled(run.model):
                return _seen_accuracy(trainer, run, t)
        finally:  # back to theta_hat_{t-1} exactly (start + 0 * delta)
            zero = {k: 0.0 for k in alpha}
            run.merged.apply(run.model, lora_start, lora_deltas, zero)
            run.merged.apply(run.model, before, full_deltas, zero)

    return score


def _choose_alpha(run: Run, state: ContinualState, deltas: dict, t: int, task: Task, extra: dict) -> tuple:
    rule = get_merge_rule(run.merge_args.merge_method)
    fisher, terms, seconds = None, None, 0.0
    if rule.needs_fisher:
        start = time.perf_counter()
        run.set_mask(task.classes)  # the training loss of the task (METHOD.md): same mask as training
        fisher = estimate_fisher(
            run.model,
            task.train,
            run.stream.collate_fn,
            run.fisher_args,
            keys=list(deltas),
            seed=run.args.seed + t,
            show_progress=not run.args.disable_tqdm,
        )
        fisher = normalize_fisher(fisher, run.fisher_args.fisher_normalize)
        seconds = time.perf_counter() - start
    start = time.perf_counter()  # alpha selection counts as merge time (results.json `timings.merge`)
    if rule.needs_fisher:
        if not state.S:
            device = run.merge_args.accumulator_device
            state.S, state.G = zeros_like_dict(deltas, device), zeros_like_dict(deltas, device)
        terms = alpha_terms(deltas, fisher, state.S, state.G)
    ma = run.merge_args
    ctx = MergeContext(
        deltas,
        t + 1,
        fisher,
        state.S or None,
        state.G or None,
        ma.alpha,
        ma.alpha_clip,
        ma.alpha_min,
        ma.alpha_granularity,
        taus=extra.get("taus"),
        state=state.rule,
        score=extra.get("score"),
        grid=tuple(float(a) for a in ma.oracle_grid),
        density=float(ma.ties_density),
    )
    choices = rule.fn(ctx)
    return fisher, terms, choices, seconds, time.perf_counter() - start


def _non_head(run: Run, keys) -> list[str]:
    return [k for k in keys if not _head_rows(run, k)]


def capture_theta0(run: Run) -> dict[str, torch.Tensor]:
    """Pretrained values (fp32 copies) of the LoRA-adapted weights and the non-head fully trained parameters."""
    out = {k: layer.get_base_layer().weight.detach().float().clone() for k, layer in lora_layers(run.model).items()}
    params = full_trainable_params(run.model)
    out.update({k: params[k].detach().float().clone() for k in _non_head(run, params)})
    return out


def _start_weights(run: Run, state: ContinualState, t: int) -> None:
    """Put the weights task t trains from in place, for rules that do not start from the merged model."""
    rule = get_merge_rule(run.merge_args.merge_method)
    start = dict(run.theta0)
    if rule.start == "chain" and t > 0:  # the previous task's fine-tuned values: same adapter, same full params
        load_adapter_state(
            run.model, {k[len("adapter/") :]: v for k, v in state.rule.items() if k.startswith("adapter/")}
        )
        start.update({k[len("chain/") :]: v for k, v in state.rule.items() if k.startswith("chain/")})
    _restore_weights(run, start)


def _head_features(run: Run, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (features) and labels of `dataset` under the current model, in dataset order."""
    head = find_head(run.model, run.stream.num_classes)[1]
    feats, labels = [], []

    def grab(module, args):
        feats.append(args[0].detach().float().reshape(args[0].shape[0], -1))

    handle = head.register_forward_pre_hook(grab)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=run.args.per_device_eval_batch_size, collate_fn=run.stream.collate_fn
    )
    was_training = run.model.training
    run.model.eval()
    device = next(run.model.parameters()).device
    try:
        with torch.no_grad():
            for batch in loader:
                labels.append(batch.pop("labels"))
                run.model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
        run.model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _align_head(run: Run, state: ContinualState, task: Task, t: int, before: torch.Tensor | None = None) -> None:
    """Refit head rows on the merged model's features (METHOD.md remedies). 'task' / 'seen': the new classes' rows
    on the task's data, old rows frozen. 'prototypes': add the task's features to the per-class statistics kept in
    the state (`classstats/*`, fixed size; with `head_align_drift: sdc` the old classes' means first follow the
    drift measured on this task's data, `before` = its features under the previous model), then refit every seen
    row on class-balanced pseudo-features."""
    mode = run.merge_args.head_align
    head = find_head(run.model, run.stream.num_classes)[1]
    device = head.weight.device
    x, y = _head_features(run, task.train)
    classes = task.classes if mode == "task" else _eval_classes(run, t)
    rows = task.classes
    if mode == "prototypes":
        prefix = "classstats/"
        stats = {k[len(prefix) :]: v for k, v in state.rule.items() if k.startswith(prefix)}
        if stats and before is not None:
            old = [c for c in classes if c not in task.classes and stats["count"][c] > 0]
            stats["mean"] = compensate_drift(stats["mean"], old, before.cpu(), x.cpu())
        stats = update_class_stats(stats, x.cpu(), y.cpu(), head.weight.shape[0])
        state.rule.update({prefix + k: v for k, v in stats.items()})
        x, y = sample_class_features(stats, classes, run.merge_args.head_align_samples, seed=run.args.seed + t)
        rows = classes
    weight, bias = fit_head_rows(
        x,
        y.to(device),
        head.weight.detach(),
        None if head.bias is None else head.bias.detach(),
        rows=rows,
        classes=classes,
        steps=run.merge_args.head_align_steps,
        lr=run.merge_args.head_align_lr,
        seed=run.args.seed + t,
    )
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias)


def run_task(run: Run, state: ContinualState, t: int, callbacks: list) -> dict:
    """Train, merge and evaluate task t; returns its log entry."""
    rule = get_merge_rule(run.merge_args.merge_method)
    task = run.stream.tasks[t]
    seen_before = {c for prev in run.stream.tasks[:t] for c in prev.classes}
    drift_before, drift_s = None, 0.0
    if run.merge_args.head_align == "prototypes" and run.merge_args.head_align_drift == "sdc" and t > 0:
        start = time.perf_counter()
        drift_before = _head_features(run, task.train)[0]  # under theta_hat_{t-1}, for the drift of old means
        drift_s = time.perf_counter() - start
    torch.manual_seed(run.args.seed + 7919 * t)  # the fresh adapter's A depends only on (seed, task)
    if rule.start != "chain" or t == 0:
        reset_adapter(run.model)
    if rule.start != "merged":
        _start_weights(run, state, t)
    before = {k: p.detach().float().clone() for k, p in full_trainable_params(run.model).items()}
    run.set_mask(task.classes if run.data_args.scenario != "domain_incremental" else None)

    trainer = PMTrainer(
        model=run.model,
        args=_task_args(run.args, run.out, t),
        train_dataset=task.train,
        data_collator=run.stream.collate_fn,
        task_index=t,
        callbacks=callbacks,
        head_modules=_heads(run),
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    delta_norm = task_vector_norm(run.model)
    pre = (
        _lm_scores(run, task.eval)[run.primary]
        if run.is_lm
        else _accuracy(trainer, run, task.eval, _eval_classes(run, t))
    )

    start = time.perf_counter()
    lora_deltas = lora_task_vector(run.model)
    full_deltas = _full_deltas(run, before, task, seen_before)
    _fix_head(run, before, task, seen_before)
    deltas = {**lora_deltas, **full_deltas}
    extra = {}
    if rule.output == "delta":
        params = full_trainable_params(run.model)
        extra["taus"] = {
            **lora_deltas,
            **{k: params[k].detach().float() - run.theta0[k] for k in _non_head(run, params)},
        }
        if rule.start == "chain":  # what the next task continues from
            state.rule.update({f"adapter/{k}": v for k, v in adapter_state(run.model).items()})
            state.rule.update({f"chain/{k}": params[k].detach().float().clone() for k in _non_head(run, params)})
    oracle_scores: dict[str, float] = {}
    if rule.needs_eval:
        score = _oracle_score(run, trainer, t, lora_deltas, full_deltas, before)
        extra["score"] = lambda a: oracle_scores.setdefault(str(a), score(a))
    merge_s0 = time.perf_counter() - start
    fisher, terms, choices, fisher_s, alpha_s = _choose_alpha(run, state, deltas, t, task, extra)
    start = time.perf_counter()
    if rule.output == "delta":  # theta_hat_t = theta_0 + D_t
        ones = {k: 1.0 for k in choices}
        lora_d = {k: v for k, v in choices.items() if k in lora_deltas}
        run.merged.apply(run.model, run.theta0, lora_d, ones)
        run.merged.apply(run.model, run.theta0, {k: v for k, v in choices.items() if k not in lora_d}, ones)
        a = 1.0 if rule.name == "seq" else float(run.merge_args.alpha)
        choices = {k: AlphaChoice(a, a) for k in deltas}
    else:
        alpha = {k: c.value for k, c in choices.items()}
        if fisher is not None:
            state.S, state.G = update_accumulators(deltas, fisher, state.S, state.G, alpha)
        if run.args.should_save and all(c.weight is None for c in choices.values()):
            save_task_record(run.out, t, record_task(run.model, alpha))
        run.merged.apply(run.model, None, lora_deltas, alpha)
        run.merged.apply(run.model, before, full_deltas, alpha)
    zero_adapter(run.model)  # theta_hat_t is now in the base weights: zero the adapter's contribution
    merge_s = merge_s0 + alpha_s + time.perf_counter() - start
    align_s = drift_s  # the head alignment's time includes the drift pass made before training
    if run.merge_args.head_align != "none":
        start = time.perf_counter()
        _align_head(run, state, task, t, drift_before)
        align_s += time.perf_counter() - start

    start = time.perf_counter()
    per_task = [_scores(trainer, run, j, t) for j in range(t + 1)]
    scores = {name: [s[name] for s in per_task] for name in per_task[0]}
    row = scores[run.primary]
    row_til = scores.get("til_accuracy")
    eval_s = time.perf_counter() - start
    first = next(iter(choices.values()))
    entry = {
        "task": task.name,
        "R": row,
        "R_til": row_til,
        "scores": scores if run.is_lm else None,  # classifiers: R and R_til already hold them
        "pre_merge_acc": pre,
        "alpha": first.alpha,
        "alpha_raw": first.raw,
        "alpha_fallback": first.fallback,
        "alpha_per_key": {k: c.alpha for k, c in choices.items()}
        if run.merge_args.alpha_granularity != "global"
        else None,
        "terms": None
        if terms is None
        else {"fisher_delta_sq": terms.fisher_delta_sq, "g_delta": terms.g_delta, "denominator": terms.denominator},
        "oracle_scores": oracle_scores or None,
        "delta_norm": delta_norm,
        "branch_counts": {str(b): n for b, n in trainer.branch_counts.items()},
        "timings": {"train": train_s, "fisher": fisher_s, "merge": merge_s, "head_align": align_s, "eval": eval_s},
    }
    trainer.log(
        {
            "continual/task": t,
            "continual/alpha": first.alpha,
            "continual/alpha_raw": _finite(first.raw),
            "continual/pre_merge_acc": pre,
            "continual/acc_seen": row[-1] if row else 0.0,
            "continual/delta_norm": delta_norm,
        }
    )
    return entry


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


LOWER_IS_BETTER = ("eval_loss",)


def _matrix(entries: list[dict], get) -> list[list]:
    T = len(entries)
    return [[get(e)[j] if j < len(get(e)) else None for j in range(T)] for e in entries]


def _as_nan(m: list[list]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)


def score_summary(name: str, R: list[list], sizes: list[int]) -> dict:
    """final / aaa / bwt / forgetting of one score matrix. Higher is better, except losses (`LOWER_IS_BETTER`): their
    matrix is negated for the summaries, so the conventions of accuracy hold: bwt < 0 and forgetting > 0 mean
    forgetting (for a loss: it went up); `final` and `aaa` are the losses themselves."""
    M = _as_nan(R)
    if name in LOWER_IS_BETTER:
        neg = metrics.summarize(-M, sizes=sizes)
        return {"final": -neg["acc"], "aaa": -neg["aaa"], "bwt": neg["bwt"], "forgetting": neg["forgetting"]}
    out = metrics.summarize(M, sizes=sizes)
    return {"final": out["acc"], "aaa": out["aaa"], "bwt": out["bwt"], "forgetting": out["forgetting"]}


def results_dict(run: Run, state: ContinualState, config: dict) -> dict:
    """results.json: the score matrices (R[t][j] = score of task j after task t) and their summaries, alpha per task,
    timings and the config. `accuracy_matrix` and acc/aaa/bwt/forgetting are those of the primary score ('accuracy'
    over all seen classes for classifiers, `primary_metric` for causal LMs); `score_matrices` holds every score."""
    T = state.completed
    # keys added by a newer version are missing for tasks logged before: pad them with None at the front
    log = {k: [None] * (T - len(v)) + list(v) for k, v in state.log.items()}
    entries = [{k: v[i] for k, v in log.items()} for i in range(T)]
    R = _matrix(entries, lambda e: e["R"])
    sizes = [len(run.stream.tasks[j].eval) for j in range(T)]
    summary = metrics.summarize(_as_nan(R), sizes=sizes) if T else {}
    if run.is_lm:
        complete = T and all(e.get("scores") for e in entries)  # runs resumed from an older version may lack them
        names = list(entries[0]["scores"]) if complete else []
        score_matrices = {n: _matrix(entries, lambda e, n=n: e["scores"][n]) for n in names}
    else:
        score_matrices = {"accuracy": R, "til_accuracy": _matrix(entries, lambda e: e["R_til"])} if T else {}
    out = {
        "tasks": [e["task"] for e in entries],
        "primary_metric": run.primary,
        "accuracy_matrix": R,
        **summary,
        "score_matrices": score_matrices,
        "score_summaries": {n: score_summary(n, m, sizes) for n, m in score_matrices.items()},
    }
    if not run.is_lm:
        R_til = _matrix(entries, lambda e: e["R_til"])
        out["til_accuracy_matrix"] = R_til
        out["til_acc"] = metrics.summarize(_as_nan(R_til)).get("acc") if T else None
    out.update(
        {
            "alphas": [e["alpha"] for e in entries],
            "alphas_raw": [e["alpha_raw"] for e in entries],
            "pre_merge_acc": [e["pre_merge_acc"] for e in entries],
            "oracle_scores": [e.get("oracle_scores") for e in entries],
            "alpha_terms": [e["terms"] for e in entries],
            "delta_norms": [e["delta_norm"] for e in entries],
            "branch_counts": [e["branch_counts"] for e in entries],
            "timings": [e["timings"] for e in entries],
            "peak_rss_mb": _peak_rss_mb(),
            "eval_sizes": sizes,
            "config": config,
            "output_dir": str(run.out),
        }
    )
    return out


def _peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except (ImportError, OSError):
        return None


def _write_outputs(run: Run, results: dict) -> None:
    import json

    atomic_write_text(run.out / "results.json", json.dumps(results, indent=1, default=float))
    R = _as_nan(results["accuracy_matrix"])
    metrics.plot_accuracy_matrix(R, str(run.out / "accuracy_matrix.png"), task_names=None, title="R[t][j]")
    for name, matrix in results["score_matrices"].items():
        if name in ("accuracy", "til_accuracy"):
            continue  # accuracy_matrix.png already shows the primary score of classifiers
        metrics.plot_accuracy_matrix(
            _as_nan(matrix), str(run.out / f"score_matrix_{name}.png"), task_names=None, title=f"{name}: R[t][j]"
        )
    sizes = np.asarray(results["eval_sizes"], dtype=float)
    seen = [float(np.dot(R[t, : t + 1], sizes[: t + 1]) / sizes[: t + 1].sum()) for t in range(len(R))]
    metrics.plot_accuracy_curve(
        seen, results["alphas"], str(run.out / "accuracy_curve.png"), alphas_raw=results["alphas_raw"]
    )


def _model_weights(run: Run) -> dict[str, torch.Tensor]:
    """theta_hat as stored in checkpoints: base weights of LoRA layers (fp32 master if any) + full parameters."""
    out = {}
    for key, layer in lora_layers(run.model).items():
        out[key] = run.merged.master.get(key, layer.get_base_layer().weight.detach())
    out.update({k: p.detach() for k, p in full_trainable_params(run.model).items()})
    return out


def _restore_weights(run: Run, weights: dict[str, torch.Tensor]) -> None:
    targets = MergedWeights.targets(run.model, weights)
    with torch.no_grad():
        for key, value in weights.items():
            if targets[key].dtype != torch.float32:
                run.merged.master[key] = value.float().to(run.merged.device or targets[key].device)
            targets[key].copy_(value.to(targets[key].device, targets[key].dtype))


def joint_stream(stream: TaskStream) -> TaskStream:
    """The whole sequence as ONE task (all classes, all training data): the `joint` upper bound."""
    import datasets

    def concat(parts: list) -> datasets.Dataset:
        joined = datasets.concatenate_datasets(parts)
        fmt = parts[0].format
        if fmt.get("type") == "custom":  # lazy image transforms are not carried by concatenation: re-attach
            joined.set_transform(
                fmt["format_kwargs"]["transform"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"]
            )
        return joined

    tasks = stream.tasks
    task = Task(
        f"joint: {len(tasks)} tasks",
        sorted({c for t in tasks for c in t.classes}),
        concat([t.train for t in tasks]),
        concat([t.eval for t in tasks]),
    )
    return TaskStream([task], stream.num_classes, stream.label_names, stream.modality, stream.collate_fn)


def build_run(model_args, data_args, training_args, lora_args, fisher_args, merge_args) -> Run:
    rule = get_merge_rule(merge_args.merge_method)
    if rule.start != "merged" and data_args.scenario == "domain_incremental":
        raise ValueError(
            f"`merge_method` = {rule.name!r} merges task vectors relative to the pretrained weights and is implemented "
            "for class- and task-incremental streams only; with `scenario: domain_incremental` use an alpha rule "
            "('pm', 'average', 'coma', 'cofima', ...)."
        )
    set_seed(training_args.seed)
    if is_causal_lm(model_args):
        if merge_args.head_align != "none":
            raise ValueError(
                f"`head_align` = {merge_args.head_align!r} refits a class head, but a causal LM has none; "
                "set `head_align: none` for instruction tuning."
            )
        model_args = dataclasses.replace(model_args, model_task="causal_lm")
        tokenizer = load_processor(model_args)
        stream = build_instruction_stream(
            data_args, tokenizer, seed=training_args.seed, main_process_first=training_args.main_process_first
        )
        if rule.name == "joint":
            stream = joint_stream(stream)
        model = load_causal_lm(model_args)
        if not lora_args.target_modules:  # instruction tuning: q/k/v/o by default, detected per family
            lora_args = dataclasses.replace(lora_args, target_modules=detect_target_modules(model, "qkvo"))
        head_name, mask, processor = None, None, tokenizer
        peft_model = attach_lora(model, lora_args)
    else:
        processor = load_processor(model_args)
        stream = build_task_stream(
            data_args, processor, seed=training_args.seed, main_process_first=training_args.main_process_first
        )
        if rule.name == "joint":
            stream = joint_stream(stream)
        set_seed(training_args.seed)  # the new head's initialisation must not depend on what ran before in the process
        model = load_model(model_args, stream.modality, stream.num_classes, stream.label_names)
        head_name, head = find_head(model, stream.num_classes)
        mask = ClassMask(head, stream.num_classes)
        peft_model = attach_lora(model, lora_args, trainable_modules=[head_name])
    run = Run(
        peft_model,
        stream,
        mask,
        head_name,
        training_args,
        fisher_args,
        merge_args,
        data_args,
        model_args,
        lora_args,
        Path(training_args.output_dir),
        MergedWeights(merge_args.accumulator_device),
        tokenizer=processor,
    )
    if rule.start != "merged":
        run.theta0 = capture_theta0(run)
    return run


def run_continual(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: PMConfig,
    lora_args: LoraArguments,
    fisher_args: FisherArguments,
    merge_args: MergeArguments,
    resume: bool = False,
    callbacks: list | None = None,
    task_callbacks: list[TaskCallback] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run (or resume) the whole sequence; writes results.json, plots, checkpoints and the merged adapter.

    Args:
        *_args: the six argument groups (see `pm_hf.config`).
        resume: continue after the last completed task of `output_dir`.
        callbacks: `TrainerCallback`s passed to every task's `PMTrainer`.
        task_callbacks: `fn(t, entry)` called after each task's checkpoint.
        stop_after: stop after this many completed tasks (for tests and staged runs).

    Returns:
        The results dict written to `output_dir/results.json`.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"launched with WORLD_SIZE={launched} processes but the training arguments see world_size="
            f"{training_args.world_size}: every process would train alone and write the same files. On a machine "
            "without a GPU set `use_cpu: true` (gloo backend)."
        )
    run = build_run(model_args, data_args, training_args, lora_args, fisher_args, merge_args)
    config = config_dict(model_args, data_args, training_args, lora_args, fisher_args, merge_args)
    state = ContinualState()
    if resume:
        loaded = load_checkpoint(run.out)
        if loaded is None:
            logger.warning("--resume: no checkpoint in %s, starting from task 0", run.out)
        else:
            state, weights, _ = loaded
            _restore_weights(run, weights)
    T = len(run.stream.tasks)
    last = T if stop_after is None else min(T, stop_after)
    bar = tqdm(
        range(state.completed, last),
        desc="tasks",
        initial=state.completed,
        total=T,
        disable=training_args.disable_tqdm or not training_args.should_log,
    )
    for t in bar:
        entry = run_task(run, state, t, callbacks or [])
        for key, value in entry.items():  # a key new to this version is None for tasks logged before it existed
            state.log.setdefault(key, [None] * t).append(value)
        state.completed = t + 1
        if training_args.should_save:
            save_checkpoint(run.out, state, _model_weights(run), config)
            _write_outputs(run, results_dict(run, state, config))
        for fn in task_callbacks or []:
            fn(t, entry)
        bar.set_postfix(acc=f"{entry['R'][-1]:.3f}", alpha=f"{entry['alpha']:.3f}")
    if state.completed == T and training_args.should_save:
        export_run_adapter(run, state)
    return results_dict(run, state, config)


def _heads(run: Run) -> list[str]:
    return [] if run.head_name is None else [run.head_name]


def export_run_adapter(run: Run, state: ContinualState) -> Path:
    """Write output_dir/merged_adapter (PEFT format, atomically): the merged LoRA delta plus head and full modules.

    alpha rules with one alpha per key: exactly sum_i alpha_i s_i B_i A_i (rank sum r_i, from the adapters/ log).
    Other rules (per-parameter weights, delta rules): the merged delta theta_hat - theta_0 of each adapted weight,
    factored exactly by SVD (rank = its numerical rank)."""
    import shutil

    if run.is_lm:
        base = load_causal_lm(run.model_args)
    else:
        base = load_model(run.model_args, run.stream.modality, run.stream.num_classes, run.stream.label_names)
    full = {k: p.detach().float() for k, p in full_trainable_params(run.model).items()}
    final, tmp = run.out / "merged_adapter", run.out / ".merged_adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    logged = all((run.out / "adapters" / f"task_{t}.safetensors").exists() for t in range(state.completed))
    if logged:
        history = load_task_records(run.out, state.completed)
    else:
        pretrained = attach_lora(copy.deepcopy(base), run.lora_args, trainable_modules=_heads(run))
        layers, pre_layers = lora_layers(run.model), lora_layers(pretrained)
        merged = {
            k: run.merged.master.get(k, layer.get_base_layer().weight.detach()).float() for k, layer in layers.items()
        }
        deltas = {k: merged[k] - pre_layers[k].get_base_layer().weight.detach().float() for k in layers}
        history = [dense_record(run.model, deltas)]
    export_merged_adapter(base, history, full, [*_heads(run), *(run.lora_args.modules_to_save or [])], str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def evaluate_run(run_dir: str) -> dict:
    """Rebuild a saved run from its results.json config and last checkpoint; re-evaluate every task.

    Returns:
        {"last_row": primary score per task (accuracy over all seen classes, or the LM's `primary_metric`),
        "acc": sample-weighted mean, "saved_last_row": as saved}.
    """
    import json

    out = Path(run_dir)
    saved = json.loads((out / "results.json").read_text())
    groups = dataclasses_from_config(saved["config"])
    run = build_run(*groups)
    loaded = load_checkpoint(out)
    if loaded is None:
        raise ValueError(f"`run_dir` = {run_dir!r} has no checkpoint (latest.json); was the run saved?")
    state, weights, _ = loaded
    _restore_weights(run, weights)
    trainer = PMTrainer(
        model=run.model,
        args=_task_args(run.args, out / "evaluate", 0),
        task_index=0,
        data_collator=run.stream.collate_fn,
    )
    t = state.completed - 1
    row = [_scores(trainer, run, j, t)[run.primary] for j in range(t + 1)]
    sizes = np.asarray([len(run.stream.tasks[j].eval) for j in range(t + 1)], dtype=float)
    return {
        "last_row": row,
        "acc": float(np.dot(row, sizes) / sizes.sum()),
        "saved_last_row": saved["accuracy_matrix"][t][: t + 1],
    }
