"""Task streams from Hugging Face datasets: one dataset split into class groups, or one dataset per task.

Conventions (fixed here, relied on by the continual loop):
- labels are GLOBAL class ids in [0, num_classes) and are never remapped per task; the model's head has
  `num_classes` outputs and `Task.classes` says which of them a task uses (for masking);
- class split (`task_datasets` null): groups are `class_groups`, or the sorted training labels (shuffled with
  `class_order_seed`) cut into `num_tasks` contiguous groups by `np.array_split` (uneven sizes allowed: the first
  groups get one class more). Used by class- and task-incremental scenarios alike;
- one dataset per task: 'domain_incremental' keeps each dataset's labels (a shared label set); the other
  scenarios offset task k's labels by the class counts of tasks 0..k-1 (disjoint classes);
- per-class caps pick a seeded subset (`np.random.default_rng([seed, source, split, class])`), and rows keep the
  dataset's order: nothing is shuffled here (the Trainer shuffles);
- text is tokenized eagerly (`Dataset.map`, truncation, no padding: `collate_fn` pads); images are transformed
  lazily (`with_transform`) with the image column renamed to `pixel_values`, so the Trainer's
  `remove_unused_columns` keeps it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import DataCollatorWithPadding, default_data_collator

from .config import DataArguments
from .images import image_transform

logger = logging.getLogger(__name__)

TASK_DATASET_KEYS = ("dataset_name", "data_files", "dataset_config_name")
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
LABEL_NAME_COLUMN = "label_name"
FILE_BUILDERS = ("parquet", "csv", "json", "text", "arrow", "imagefolder", "audiofolder")


@dataclass
class Task:
    name: str  # "task_0: act, animal"
    classes: list[int]  # global class ids of this task, sorted
    train: datasets.Dataset  # model inputs + "labels" (global class ids)
    eval: datasets.Dataset


@dataclass
class TaskStream:
    tasks: list[Task]
    num_classes: int  # size of the head: all classes over the whole stream
    label_names: list[str]  # per global class id
    modality: str  # "text" or "image"
    collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]]


@dataclass
class _Source:
    """One loaded dataset (train and eval splits) and what its labels look like."""

    where: str  # for messages
    short: str  # for task names
    modality: str
    train: datasets.Dataset
    eval: datasets.Dataset
    train_labels: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    label_names: dict[int, str] = field(default_factory=dict)


@dataclass
class _Plan:
    name: str
    source_index: int
    local_classes: list[int]  # label values as stored in the source
    offset: int  # global id = local + offset


def source_specs(data_args: DataArguments) -> list[dict]:
    if data_args.task_datasets is None:
        if data_args.scenario == "domain_incremental":
            raise ValueError(
                "`scenario` = 'domain_incremental' needs one dataset per task: set `task_datasets` (a list of "
                "{dataset_name, data_files, dataset_config_name}), or use 'class_incremental'."
            )
        specs = [{k: getattr(data_args, k) for k in TASK_DATASET_KEYS}]
    else:
        if not isinstance(data_args.task_datasets, (list, tuple)) or not data_args.task_datasets:
            raise ValueError(f"`task_datasets` = {data_args.task_datasets!r} is invalid: give a non-empty list.")
        specs = []
        for i, entry in enumerate(data_args.task_datasets):
            if not isinstance(entry, dict):
                raise ValueError(
                    f"`task_datasets[{i}]` = {entry!r} is invalid: give a mapping with keys {list(TASK_DATASET_KEYS)}."
                )
            unknown = sorted(set(entry) - set(TASK_DATASET_KEYS))
            if unknown:
                raise ValueError(
                    f"`task_datasets[{i}]` has unknown keys {unknown}: allowed keys are {list(TASK_DATASET_KEYS)}."
                )
            specs.append(
                {
                    "dataset_name": entry.get("dataset_name", data_args.dataset_name),
                    "data_files": entry.get("data_files"),
                    "dataset_config_name": entry.get("dataset_config_name"),
                }
            )
        if data_args.class_groups is not None:
            logger.warning("`class_groups` is ignored: `task_datasets` defines the tasks.")
    for i, spec in enumerate(specs):
        name = "dataset_name" if data_args.task_datasets is None else f"task_datasets[{i}].dataset_name"
        if not isinstance(spec["dataset_name"], str) or not spec["dataset_name"]:
            raise ValueError(f"`{name}` = {spec['dataset_name']!r} is invalid: give a Hub id or a builder name.")
        if spec["dataset_name"] in FILE_BUILDERS and not spec["data_files"]:
            files = "data_files" if data_args.task_datasets is None else f"task_datasets[{i}].data_files"
            raise ValueError(
                f"`{files}` is missing: the '{spec['dataset_name']}' builder needs local files, "
                "e.g. {train: a.parquet, test: b.parquet}."
            )
    return specs


def describe_source(spec: dict) -> str:
    name = spec["dataset_name"] + (f"/{spec['dataset_config_name']}" if spec["dataset_config_name"] else "")
    return f"dataset '{name}'" + (f" (data_files={spec['data_files']})" if spec["data_files"] else "")


def short_name(spec: dict, train_split: str) -> str:
    """The dataset name, or for file builders the training file(s) (a domain-incremental task's name)."""
    files = spec["data_files"]
    if spec["dataset_name"] not in FILE_BUILDERS or not files:
        return spec["dataset_name"] + (f"/{spec['dataset_config_name']}" if spec["dataset_config_name"] else "")
    files = files.get(train_split, files) if isinstance(files, dict) else files
    path = str(files[0] if isinstance(files, (list, tuple)) and len(files) == 1 else files)
    if isinstance(files, str) or isinstance(files, (list, tuple)) and len(files) == 1:
        stem = Path(path).name.split(".")[0]
        if stem in (train_split, "train", "training") and Path(path).parent.name:
            return Path(path).parent.name  # data/wordnet_instruct/define/train.jsonl -> "define"
    return path


def check_columns(ds: datasets.Dataset, names: dict[str, str | None], split: str, where: str) -> None:
    for arg, column in names.items():
        if column is not None and column not in ds.column_names:
            raise ValueError(
                f"`{arg}` = {column!r} is not a column of the '{split}' split of {where}; columns found: "
                f"{ds.column_names}. Set `{arg}` to one of them."
            )


def _labels(ds: datasets.Dataset, column: str, split: str, where: str) -> np.ndarray:
    feature = ds.features[column]
    dtype = getattr(feature, "dtype", "")
    if not isinstance(feature, datasets.ClassLabel) and not str(dtype).startswith(("int", "uint")):
        raise ValueError(
            f"`label_column` = {column!r} of the '{split}' split of {where} has type {feature}: "
            "it must hold integer class ids (an int or ClassLabel column)."
        )
    labels = np.asarray(ds[column], dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"`label_column` = {column!r} of the '{split}' split of {where} holds negative ids "
            f"(min {labels.min()}); class ids must lie in [0, num_classes). Unlabelled splits cannot "
            "be used as `eval_split`."
        )
    return labels


def _first_names(ds: datasets.Dataset, labels: np.ndarray, names: dict[int, str]) -> None:
    classes, first = np.unique(labels, return_index=True)
    values = ds.select_columns([LABEL_NAME_COLUMN]).select(first.tolist())[:][LABEL_NAME_COLUMN]
    for c, value in zip(classes.tolist(), values):
        names.setdefault(int(c), str(value))


def _load_source(spec: dict, data_args: DataArguments) -> _Source:
    where = describe_source(spec)
    loaded = datasets.load_dataset(spec["dataset_name"], spec["dataset_config_name"], data_files=spec["data_files"])
    splits = {}
    for arg in ("train_split", "eval_split"):
        split = getattr(data_args, arg)
        if split not in loaded:
            raise ValueError(
                f"`{arg}` = {split!r} is not a split of {where}; available splits: {list(loaded)}. "
                f"Set `{arg}` to one of them."
            )
        splits[arg] = loaded[split]
    train, evl = splits["train_split"], splits["eval_split"]
    if data_args.text_column in train.column_names:
        modality = "text"
        inputs = {"text_column": data_args.text_column, "text_pair_column": data_args.text_pair_column}
    elif data_args.image_column in train.column_names:
        modality, inputs = "image", {"image_column": data_args.image_column}
    else:
        raise ValueError(
            f"Neither `text_column` = {data_args.text_column!r} nor `image_column` = "
            f"{data_args.image_column!r} is a column of the '{data_args.train_split}' split of {where}; "
            f"columns found: {train.column_names}. Set `text_column` (text) or `image_column` (images)."
        )
    for ds, split in ((train, data_args.train_split), (evl, data_args.eval_split)):
        check_columns(ds, {**inputs, "label_column": data_args.label_column}, split, where)
    train_labels = _labels(train, data_args.label_column, data_args.train_split, where)
    eval_labels = _labels(evl, data_args.label_column, data_args.eval_split, where)
    num_classes = int(max(train_labels.max(initial=-1), eval_labels.max(initial=-1))) + 1
    names: dict[int, str] = {}
    for ds, labels in ((train, train_labels), (evl, eval_labels)):
        if LABEL_NAME_COLUMN in ds.column_names and LABEL_NAME_COLUMN != data_args.label_column:
            _first_names(ds, labels, names)
    feature = train.features[data_args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        num_classes = max(num_classes, feature.num_classes)
        for c, name in enumerate(feature.names):
            names.setdefault(c, name)
    if num_classes == 0:
        raise ValueError(f"The '{data_args.train_split}' split of {where} is empty.")
    short = short_name(spec, data_args.train_split)
    return _Source(where, short, modality, train, evl, train_labels, eval_labels, num_classes, names)


def _summary(classes: list[int], names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[c] for c in classes[:limit])
    return shown + (f", ... (+{len(classes) - limit})" if len(classes) > limit else "")


def _class_groups(data_args: DataArguments, present: list[int], where: str) -> list[list[int]]:
    if data_args.class_groups is not None:
        groups = data_args.class_groups
        flat = [c for group in groups for c in group]
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in flat):
            raise ValueError(f"`class_groups` = {groups!r} is invalid: class ids must be integers.")
        missing = sorted(set(flat) - set(present))
        if missing:
            raise ValueError(
                f"`class_groups` = {groups!r} names class ids {missing} that are not in the "
                f"'{data_args.train_split}' split of {where}; classes found: {present}."
            )
        return [sorted(int(c) for c in group) for group in groups]
    order = np.asarray(present)
    if data_args.class_order_seed is not None:
        order = np.random.default_rng(data_args.class_order_seed).permutation(order)
    if data_args.num_tasks > len(order):
        raise ValueError(
            f"`num_tasks` = {data_args.num_tasks} is larger than the {len(order)} classes of {where}: "
            "use at most one task per class."
        )
    return [sorted(g.tolist()) for g in np.array_split(order, data_args.num_tasks)]


def _plan(data_args: DataArguments, sources: list[_Source]) -> tuple[list[_Plan], int, list[str]]:
    """Which classes of which source make each task, the head size and the label names."""
    if data_args.task_datasets is None:
        src = sources[0]
        names = [src.label_names.get(c, str(c)) for c in range(src.num_classes)]
        groups = _class_groups(data_args, np.unique(src.train_labels).tolist(), src.where)
        plans = [_Plan(f"task_{t}: {_summary(g, names)}", 0, g, 0) for t, g in enumerate(groups)]
        return plans, src.num_classes, names
    plans, names, offset = [], {}, 0
    domain = data_args.scenario == "domain_incremental"
    for t, src in enumerate(sources):
        local = np.union1d(src.train_labels, src.eval_labels).astype(int).tolist()
        shift = 0 if domain else offset
        for c in range(src.num_classes):
            names.setdefault(c + shift, src.label_names.get(c, str(c)))
        plans.append(_Plan(f"task_{t}: ", t, local, shift))
        offset += src.num_classes
    num_classes = max(s.num_classes for s in sources) if domain else offset
    label_names = [names.get(c, str(c)) for c in range(num_classes)]
    for plan in plans:
        classes = [c + plan.offset for c in plan.local_classes]
        plan.name += sources[plan.source_index].short if domain else _summary(classes, label_names)
    return plans, num_classes, label_names


def _select(labels: np.ndarray, classes: list[int], cap: int | None, key: list[int]) -> list[int]:
    """Row indices of `classes`, at most `cap` per class (seeded by `key` + class), in dataset order."""
    picked = []
    for c in classes:
        rows = np.flatnonzero(labels == c)
        if cap is not None and len(rows) > cap:
            rows = np.random.default_rng([*key, c]).choice(rows, size=cap, replace=False)
        picked.append(rows)
    return np.sort(np.concatenate(picked)).tolist() if picked else []


def _tokenize(ds: datasets.Dataset, tokenizer, data_args: DataArguments, offset: int, desc: str) -> datasets.Dataset:
    text, pair, label = data_args.text_column, data_args.text_pair_column, data_args.label_column

    def encode(batch):
        args = (batch[text],) if pair is None else (batch[text], batch[pair])
        enc = tokenizer(*args, truncation=True, max_length=data_args.max_length)
        out = {k: enc[k] for k in TEXT_INPUT_KEYS if k in enc}
        out["labels"] = [int(y) + offset for y in batch[label]]
        return out

    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=desc)
    ds.set_format("torch")
    return ds


def _prepare(ds, modality: str, processor, data_args: DataArguments, offset: int, desc: str) -> datasets.Dataset:
    if modality == "text":
        return _tokenize(ds, processor, data_args, offset, desc)
    ds = ds.select_columns([data_args.image_column, data_args.label_column])
    renames = {data_args.image_column: "pixel_values", data_args.label_column: "labels"}
    ds = ds.rename_columns({k: v for k, v in renames.items() if k != v})
    return ds.with_transform(image_transform(processor, offset))


def _check_processor(processor, modality: str) -> None:
    if modality == "text":
        if processor is None or not callable(processor):
            raise ValueError("Text data needs a tokenizer as `processor` (got None).")
        if getattr(processor, "pad_token", None) is None:
            raise ValueError(
                "The tokenizer has no pad token, so batches cannot be padded: set "
                "`tokenizer.pad_token` (e.g. to `tokenizer.eos_token`) before building the stream."
            )
    elif processor is not None and not callable(processor):
        raise ValueError(
            f"`processor` = {processor!r} is not an image processor: give one, or None for the "
            "built-in [0, 1] float transform."
        )


def build_task_stream(
    data_args: DataArguments, processor, seed: int = 0, main_process_first: Callable | None = None
) -> TaskStream:
    """Load the data of `data_args`, validate it, cut it into tasks and preprocess every task.

    Args:
        data_args: the dataset(s), columns, scenario, class split and caps.
        processor: a tokenizer (text), an image processor or None (images: float [0, 1], channels first).
        seed: seeds the per-class caps (not the class order: that is `class_order_seed`).
        main_process_first: e.g. `training_args.main_process_first`; loading and tokenization run inside it so
            that rank 0 fills the datasets cache first.

    Returns:
        The `TaskStream`: tasks in order, head size, label names, modality and the collator.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` = {seed!r} is invalid: use a non-negative integer.")
    specs = source_specs(data_args)
    first = main_process_first or contextlib.nullcontext
    with first():
        sources = [_load_source(spec, data_args) for spec in specs]
    modalities = {s.modality for s in sources}
    if len(modalities) > 1:
        raise ValueError(f"`task_datasets` mixes modalities {sorted(modalities)}: every task must be text or image.")
    modality = sources[0].modality
    _check_processor(processor, modality)
    plans, num_classes, label_names = _plan(data_args, sources)

    tasks = []
    with first():
        for t, plan in enumerate(plans):
            src = sources[plan.source_index]
            splits = {}
            for code, (ds, labels, cap) in enumerate(
                (
                    (src.train, src.train_labels, data_args.max_train_samples_per_class),
                    (src.eval, src.eval_labels, data_args.max_eval_samples_per_class),
                )
            ):
                rows = _select(labels, plan.local_classes, cap, [seed, plan.source_index, code])
                desc = f"Preparing task {t} ({'train' if code == 0 else 'eval'})"
                splits[code] = _prepare(ds.select(rows), modality, processor, data_args, plan.offset, desc)
            classes = [c + plan.offset for c in plan.local_classes]
            tasks.append(Task(plan.name, classes, splits[0], splits[1]))
    collate = DataCollatorWithPadding(processor) if modality == "text" else default_data_collator
    return TaskStream(tasks, num_classes, label_names, modality, collate)
