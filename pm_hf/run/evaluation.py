"""Evaluation after each task: one evaluator per modality with the same interface, and the one seen-accuracy function.

- `ClassifierEvaluator`: 'accuracy' (argmax over all classes seen so far, or the whole label set of a
  domain-incremental stream) and 'til_accuracy' (within the task's own classes, task-incremental), from
  `Trainer.predict` (so distributed runs gather predictions the Trainer's way).
- `CausalLMEvaluator`: 'exact_match' and 'rougeL' of greedy generations (metric modules shipped in
  `pm_hf/eval_metrics/`, so `evaluate.load` works offline) and the response-token 'eval_loss'.

Score convention: R[t][j] = score of task j after task t. The accuracy "over all seen tasks" after task t is the
sample-weighted mean of row t, `seen_accuracy` (pm_hf.run.metrics), used by the loop, the oracle, the metrics and the
benchmark runner alike.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.instruct import (
    PROMPT_IDS_COLUMN,
    REFERENCE_COLUMN,
    PromptCollator,
    causal_lm_collator,
    encode_prompts,
    resolve_eos_token_id,
    resolve_pad_token_id,
    token_ids,
)
from ..distributed.launch import BACKEND
from ..distributed.placement import placement_of
from ..errors import require_extra
from .metrics import seen_accuracy

METRICS_DIR = Path(__file__).resolve().parents[1] / "eval_metrics"
LOWER_IS_BETTER = ("eval_loss",)


def seen_classes(tasks: Sequence) -> list[int]:
    """Classes predicted over after training `tasks`: the union of their classes."""
    return sorted({c for task in tasks for c in task.classes})


class Evaluator:
    """Scores of a task's eval split under the current model. Subclasses set `primary` and implement `scores`."""

    primary = "accuracy"

    def scores(self, task, seen: list[int]) -> dict[str, float]:
        raise NotImplementedError

    def score(self, task, seen: list[int]) -> float:
        """The primary score of one task's eval split."""
        return self.scores(task, seen)[self.primary]

    def pre_merge(self, task, seen: list[int]) -> tuple[float, float | None]:
        """The primary score of a task just trained, over the seen classes, and its accuracy within its own classes
        (None: this evaluator has no classes, or the task no eval split)."""
        return (None, None) if task.eval is None else (self.score(task, seen), None)

    def evaluate_seen(self, tasks: Sequence) -> dict[str, list[float]]:
        """Every score of every task in `tasks` (tasks 0..t), predicting over all classes they hold: row t of each
        score matrix (None for a task without an eval split)."""
        seen = seen_classes(tasks)
        per_task = [None if task.eval is None else self.scores(task, seen) for task in tasks]
        names = next((s for s in per_task if s is not None), {self.primary: None})
        return {name: [None if s is None else s[name] for s in per_task] for name in names}

    def seen_score(self, tasks: Sequence) -> float:
        """The primary score over the pooled eval sets of `tasks` (sample-weighted mean; NaN if none has one)."""
        seen = seen_classes(tasks)
        scores = [None if task.eval is None else self.score(task, seen) for task in tasks]
        return seen_accuracy(scores, [task.eval_size for task in tasks])


class ClassifierEvaluator(Evaluator):
    """Accuracy from the head's logits, masked to the classes predicted over."""

    primary = "accuracy"

    def __init__(
        self, head, predict: Callable[[datasets.Dataset], np.ndarray], compute_metrics: Callable | None = None
    ):
        self.head, self.predict, self.compute_metrics = head, predict, compute_metrics

    def _logits(self, dataset: datasets.Dataset, classes: list[int]) -> np.ndarray:
        self.head.set_active(classes)
        logits = self.predict(dataset)
        return np.asarray(logits[0] if isinstance(logits, tuple) else logits)

    def accuracy(self, dataset: datasets.Dataset, classes: list[int]) -> float:
        return float((self._logits(dataset, classes).argmax(-1) == np.asarray(dataset["labels"])).mean())

    def scores(self, task, seen):
        """'accuracy' over the seen classes, 'til_accuracy' within the task, and the user's `compute_metrics` on the
        seen-class logits (an `EvalPrediction` per task), all from one pass (`pre_merge`'s)."""
        labels, logits = np.asarray(task.eval["labels"]), self._logits(task.eval, seen)
        out = {"accuracy": float((logits.argmax(-1) == labels).mean()), "til_accuracy": within(logits, labels, task)}
        if self.compute_metrics is None:
            return out
        from transformers import EvalPrediction

        extra = self.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
        return {**out, **{k: float(v) for k, v in extra.items() if k not in out}}

    def score(self, task, seen):
        return self.accuracy(task.eval, seen)

    def pre_merge(self, task, seen):
        """From one pass: the logits masked to the seen classes, then restricted to the task's own (a subset)."""
        if task.eval is None:
            return None, None
        logits, labels = self._logits(task.eval, seen), np.asarray(task.eval["labels"])
        return float((logits.argmax(-1) == labels).mean()), within(logits, labels, task)


def within(logits: np.ndarray, labels: np.ndarray, task) -> float:
    """The accuracy within the task's own classes from logits over more classes (the same unmasked values): the argmax
    among its classes in ascending order, as a pass masked to them takes it (the first of equal maxima)."""
    own = np.sort(np.asarray(task.classes))
    return float((own[logits[:, own].argmax(-1)] == labels).mean())


def evaluation_metrics(scores: dict[str, list], sizes: Sequence[int], prefix: str = "eval") -> dict[str, float]:
    """`Trainer.evaluate`'s metrics of one row of scores (`Evaluator.evaluate_seen`): `<prefix>_<score>` over the
    tasks' eval rows pooled and `<prefix>_task_<j>_<score>` per task ('eval_loss' as `<prefix>_loss`); tasks without
    an eval split have none."""
    metrics = {}
    for score, row in scores.items():
        name = score.removeprefix("eval_")
        metrics[f"{prefix}_{name}"] = seen_accuracy(row, sizes)
        metrics.update({f"{prefix}_task_{j}_{name}": v for j, v in enumerate(row) if v is not None})
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}


def trainer_predict(model: nn.Module, args, collate_fn) -> Callable[[datasets.Dataset], np.ndarray]:
    """`Trainer.predict(...).predictions` of one quiet Trainer kept for the run (no trackers, no progress bars)."""
    from transformers import Trainer

    args = copy.deepcopy(args)
    args.report_to, args.disable_tqdm, args.push_to_hub = [], True, False
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    BACKEND.share_deepspeed_plugin(args)
    trainer = BACKEND.predicting(Trainer(model=model, args=args, data_collator=collate_fn))
    return lambda dataset: trainer.predict(dataset).predictions


class CausalLMEvaluator(Evaluator):
    """Generation scores (exact match, ROUGE-L) and the response-token eval loss of a task's eval split."""

    def __init__(self, model: nn.Module, tokenizer, collate_fn, batch_size: int, max_new_tokens: int, primary: str):
        require_text_metrics()  # before any training, not at the first evaluation
        self.model, self.tokenizer, self.collate_fn = model, tokenizer, collate_fn
        self.batch_size, self.max_new_tokens, self.primary = batch_size, max_new_tokens, primary

    def scores(self, task, seen):
        dataset = task.eval
        predictions = generate_responses(
            self.model, self.tokenizer, dataset, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens
        )
        scores = score_generations(predictions, dataset[REFERENCE_COLUMN])
        scores["eval_loss"] = instruction_eval_loss(self.model, dataset, self.collate_fn, batch_size=self.batch_size)
        return scores


def _stop_token_ids(tokenizer, model: nn.Module | None = None) -> list[int]:
    ids = [resolve_eos_token_id(tokenizer)]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in [config_eos] if isinstance(config_eos, int) else list(config_eos or []):
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


# --------------------------------------------------------------------------------------- generation and loss
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prompt_ids(tokenizer, prompts_or_dataset, use_chat_template: bool | None) -> list[list[int]]:
    items = prompts_or_dataset
    if isinstance(items, datasets.Dataset):
        column = PROMPT_IDS_COLUMN if PROMPT_IDS_COLUMN in items.column_names else None
        if column is None:
            raise ValueError(
                f"The dataset has no `{PROMPT_IDS_COLUMN}` column (columns: {items.column_names}); pass an eval "
                "split of `build_instruction_stream`, or a list of prompt strings."
            )
        return [token_ids(x) for x in items[column]]
    items = list(items)
    if all(isinstance(x, str) for x in items):
        return encode_prompts(tokenizer, items, use_chat_template)
    if all(isinstance(x, Mapping) for x in items):
        return [token_ids(x[PROMPT_IDS_COLUMN] if PROMPT_IDS_COLUMN in x else x["input_ids"]) for x in items]
    if all(isinstance(x, (list, tuple, torch.Tensor)) for x in items):
        return [token_ids(x) for x in items]
    raise ValueError(
        "`prompts_or_dataset` must be a list of prompt strings, a list of token-id lists, rows with "
        f"`{PROMPT_IDS_COLUMN}`, or an eval split of `build_instruction_stream`."
    )


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts_or_dataset,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    use_chat_template: bool | None = None,
) -> list[str]:
    """Greedy responses, one per prompt, in input order.

    `prompts_or_dataset`: raw prompt strings (formatted like training, `encode_prompts`), token-id lists, rows or an
    eval split holding `prompt_input_ids`. Prompts are sorted by length, left-padded (`PromptCollator`) in batches of
    `batch_size` and generated with `do_sample=False, num_beams=1`, stopping at the end-of-sequence id(s); only the
    new tokens are decoded (`skip_special_tokens=True`, stripped). Works on plain and PEFT-wrapped models; the
    model's train/eval mode is restored afterwards.
    """
    from transformers import GenerationConfig

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` = {batch_size!r} is invalid: use a positive integer.")
    prompt_ids = _prompt_ids(tokenizer, prompts_or_dataset, use_chat_template)
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("An empty prompt (0 tokens) cannot be continued; give every prompt at least one token.")
    pad = resolve_pad_token_id(tokenizer)
    stop = _stop_token_ids(tokenizer, model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=stop if len(stop) > 1 else stop[0],
    )
    collate = PromptCollator(pad)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[str | None] = [None] * len(prompt_ids)
    device = _device(model)
    sharded = placement_of(model).forward_is_collective(model)  # split weights: every rank runs until all are done
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([{PROMPT_IDS_COLUMN: prompt_ids[i]} for i in rows]).items()}
            generated = model.generate(**batch, generation_config=config, synced_gpus=sharded)
            new = generated[:, batch["input_ids"].shape[1] :]
            for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[i] = text.strip()
    return out  # type: ignore[return-value]


@torch.no_grad()
def instruction_eval_loss(
    model: nn.Module, dataset, collate_fn: Callable | None = None, batch_size: int = 8, tokenizer=None
) -> float:
    """Mean token cross-entropy over all response tokens of `dataset` (token-weighted across samples), in nats.

    `collate_fn` defaults to `causal_lm_collator(tokenizer)`. Returns NaN when no token is supervised.
    """
    from torch.utils.data import DataLoader

    if collate_fn is None:
        if tokenizer is None:
            raise ValueError("Give `collate_fn` (e.g. `TaskStream.collate_fn`) or a `tokenizer` to build one.")
        collate_fn = causal_lm_collator(tokenizer)
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model):
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, shuffle=False):
            labels = batch["labels"].to(device)[:, 1:]
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits[:, :-1].float()
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(ce)
            count += int((labels != -100).sum())
    return total / count if count else float("nan")


@torch.no_grad()
def mean_loss(model: nn.Module, dataset, collate_fn: Callable, batch_size: int = 16) -> float:
    """The model's training loss on `dataset` in eval mode (no dropout): the sample-weighted mean of a classifier's
    loss (under whatever logit mask is active), the token-weighted response cross-entropy of a causal LM."""
    from torch.utils.data import DataLoader

    rows = list(dataset)
    if rows and "labels" in collate_fn(rows[:1]) and collate_fn(rows[:1])["labels"].dim() > 1:
        return instruction_eval_loss(model, rows, collate_fn, batch_size)
    device = _device(model)
    total, count = 0.0, 0
    with _eval_mode(model):
        for batch in DataLoader(rows, batch_size=batch_size, collate_fn=collate_fn, shuffle=False):
            n = len(batch["labels"])
            total += float(model(**{k: v.to(device) for k, v in batch.items()}).loss) * n
            count += n
    return total / count if count else float("nan")


# ------------------------------------------------------------------------------------------------------ scores


def metric_path(name: str) -> str:
    """Folder of a metric module shipped in the package (`exact_match` or `rouge`), for `evaluate.load`."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No metric module {name!r} in {METRICS_DIR}; available: {available}.")
    return str(path)


def require_text_metrics() -> None:
    """The generation scores need the extra `pm_hf[text-metrics]` (evaluate, rouge_score): `MissingExtraError` if not
    installed."""
    require_extra("text-metrics", "scoring generations (exact match, ROUGE-L)", "evaluate", "rouge_score")


@functools.cache
def load_metric(name: str):
    """`evaluate.load` of a shipped metric module (offline; cached per process)."""
    require_text_metrics()
    import evaluate

    return evaluate.load(metric_path(name))


def score_generations(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, float]:
    """{"exact_match", "rougeL"}: fractions in [0, 1] from the shipped metric modules (see their docstrings for the
    normalisation); ROUGE-L is the mean F-measure (Porter stemming when `use_stemmer`)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: give one per reference.")
    if not predictions:
        raise ValueError("No predictions to score.")
    em = load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
    rouge = load_metric("rouge").compute(predictions=predictions, references=references, use_stemmer=use_stemmer)
    return {"exact_match": float(em), "rougeL": float(rouge["rougeL"])}
