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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import torch
from transformers import DataCollatorWithPadding, default_data_collator

from ..config.checks import invalid
from ..config.groups import DataArguments
from .images import check_images, image_transform
from .sources import Source, labels_of, load_source, source_specs

logger = logging.getLogger(__name__)

TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Task:
    name: str  # "task_0: act, animal"
    classes: list[int]  # global class ids of this task, sorted
    train: datasets.Dataset  # model inputs + "labels" (global class ids)
    eval: datasets.Dataset | None  # None: a task given without an eval split (trained and merged, never scored)
    heldout: datasets.Dataset | None = None  # part of the training data held out for a strategy's probe

    @property
    def eval_size(self) -> int:
        """Rows of the eval split (0 without one): the task's weight in the scores over all seen tasks."""
        return 0 if self.eval is None else len(self.eval)


@dataclass
class TaskStream:
    tasks: list[Task]
    num_classes: int  # size of the head: all classes over the whole stream
    label_names: list[str]  # per global class id
    modality: str  # "text" or "image"
    collate_fn: Callable[[list[dict]], dict[str, torch.Tensor]]


@dataclass
class _Plan:
    name: str
    source_index: int
    local_classes: list[int]  # label values as stored in the source
    offset: int  # global id = local + offset


def _summary(classes: list[int], names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[c] for c in classes[:limit])
    return shown + (f", ... (+{len(classes) - limit})" if len(classes) > limit else "")


def _class_groups(data_args: DataArguments, present: list[int], where: str) -> list[list[int]]:
    if data_args.class_groups is not None:
        groups = data_args.class_groups
        flat = [c for group in groups for c in group]
        missing = sorted(set(flat) - set(present))
        if missing:
            fix = f"class ids {missing} are not in the '{data_args.train_split}' split of {where} ({present})."
            raise invalid("class_groups", groups, fix)
        return [sorted(int(c) for c in group) for group in groups]
    order = np.asarray(present)
    if data_args.class_order_seed is not None:
        order = np.random.default_rng(data_args.class_order_seed).permutation(order)
    per_task = 1 if data_args.scenario == "domain_incremental" else 2
    if data_args.num_tasks * per_task > len(order):
        fix = f"{where} has {len(order)} classes: use at most {len(order) // per_task} tasks of >= 2 classes."
        raise invalid("num_tasks", data_args.num_tasks, fix)
    return [sorted(g.tolist()) for g in np.array_split(order, data_args.num_tasks)]


def _plan(data_args: DataArguments, sources: list[Source]) -> tuple[list[_Plan], int, list[str]]:
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
        short = sources[plan.source_index].short  # a multi-dataset stream's task names its dataset
        plan.name += short if domain else f"{short} ({_summary(classes, label_names)})"
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
    columns = ds.column_names or []  # None for some streamed splits: their columns show when read
    where = desc.replace("Preparing ", "")
    for arg, column in (("text_column", text), ("text_pair_column", pair)):
        if columns and column is not None and column not in columns:
            raise invalid(arg, column, f"not a column of {where}; use one of {columns}.")
        feature = (ds.features or {}).get(column) if column is not None else None
        if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise invalid(arg, column, f"holds {feature} values in {where}, not text: store the texts as strings.")

    def encode(batch):
        args = (batch[text],) if pair is None else (batch[text], batch[pair])
        enc = tokenizer(*args, truncation=True, max_length=data_args.max_length)
        out = {k: enc[k] for k in TEXT_INPUT_KEYS if k in enc}
        out["labels"] = [int(y) + offset for y in batch[label]]
        return out

    if isinstance(ds, datasets.IterableDataset):  # a streamed split: tokenized on the fly
        return ds.map(encode, batched=True, remove_columns=ds.column_names).with_format("torch")
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=desc)
    ds.set_format("torch")
    return ds


def _prepare(ds, modality: str, processor, data_args: DataArguments, offset: int, desc: str) -> datasets.Dataset:
    if modality == "text":
        return _tokenize(ds, processor, data_args, offset, desc)
    if not isinstance(ds, datasets.IterableDataset):  # the collator must be able to stack them
        check_images(ds, data_args.image_column, processor, desc.replace("Preparing ", ""))
    ds = ds.select_columns([data_args.image_column, data_args.label_column])
    renames = {data_args.image_column: "pixel_values", data_args.label_column: "labels"}
    ds = ds.rename_columns({k: v for k, v in renames.items() if k != v})
    return ds.with_transform(image_transform(processor, offset))


def _check_processor(processor, modality: str, model: str | None) -> None:
    if modality == "text":
        if processor is None or not callable(processor):
            fix = "the data is text, and this model has no tokenizer (is model_task an image task?)."
            raise invalid("model_name_or_path", model, fix)
        if getattr(processor, "pad_token", None) is None:
            raise invalid("model_name_or_path", model, "its tokenizer has no pad token, so batches cannot be padded.")
    elif processor is not None and not callable(processor):
        raise invalid("processor", processor, "give an image processor, or None for the built-in [0, 1] transform.")


def _check_tasks(tasks: list[Task], data_args: DataArguments, names: list[str]) -> None:
    """Every task trains and evaluates every one of its classes; with a logit mask (class- and task-incremental)
    a task needs two classes, or its masked loss is identically zero and it trains nothing."""
    masked = data_args.scenario != "domain_incremental"
    what = "class_groups" if data_args.class_groups is not None else "num_tasks"
    value = data_args.class_groups if data_args.class_groups is not None else data_args.num_tasks
    for t, task in enumerate(tasks):
        if masked and len(task.classes) < 2:
            raise invalid(what, value, f"task {t} has one class ({names[task.classes[0]]}): give every task >= 2.")
        for split, ds in ((data_args.train_split, task.train), (data_args.eval_split, task.eval)):
            labels = np.asarray(ds.with_format(None)["labels"]) if len(ds) else np.zeros(0, np.int64)  # no columns
            missing = sorted(set(task.classes) - set(labels.tolist()))
            if missing:
                fix = f"task {t}'s classes {[names[c] for c in missing][:5]} have no rows in the '{split}' split."
                raise invalid(what, value, fix)


def build_task_stream(
    data_args: DataArguments,
    processor,
    seed: int = 0,
    main_process_first: Callable | None = None,
    model_name: str | None = None,
) -> TaskStream:
    """Load the data of `data_args`, validate it, cut it into tasks and preprocess every task.

    Args:
        data_args: the dataset(s), columns, scenario, class split and caps.
        processor: a tokenizer (text), an image processor or None (images: float [0, 1], channels first).
        seed: seeds the per-class caps (not the class order: that is `class_order_seed`).
        main_process_first: e.g. `training_args.main_process_first`; loading and tokenization run inside it so
            that rank 0 fills the datasets cache first.
        model_name: the model's name, for error messages about the processor.

    Returns:
        The `TaskStream`: tasks in order, head size, label names, modality and the collator.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise invalid("seed", seed, "use a non-negative integer.")
    specs = source_specs(data_args)
    first = main_process_first or contextlib.nullcontext
    with first():
        sources = [load_source(spec, data_args) for spec in specs]
    modalities = {s.modality for s in sources}
    if len(modalities) > 1:
        raise invalid("task_datasets", data_args.task_datasets, f"mixes {sorted(modalities)}: use one modality.")
    modality = sources[0].modality
    _check_processor(processor, modality, model_name)
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
    _check_tasks(tasks, data_args, label_names)
    return TaskStream(tasks, num_classes, label_names, modality, collator_for(modality, processor))


def collator_for(modality: str, processor) -> Callable:
    """Text: pad to the longest row of the batch; images: stack."""
    return DataCollatorWithPadding(processor) if modality == "text" else default_data_collator


EXTRA_KEYS = ("classes", "name")  # keys of a task dict that are not splits
EVAL_SPLITS = ("test", "validation", "eval")  # tried in this order while `eval_split` is left at 'test'


def _rows(splits: Mapping) -> dict:
    """What an error shows of a task: its split names and row counts (never the datasets' reprs)."""
    return {k: len(v) if hasattr(v, "__len__") else "streamed" for k, v in splits.items() if k not in EXTRA_KEYS}


def _rows_dataset(where: str, rows: Sequence[Mapping]) -> datasets.Dataset:
    """A Dataset of rows (dicts) that all have the same columns and values Arrow can hold (text as UTF-8 str,
    labels as int, images as PIL images or arrays)."""
    columns = list(rows[0])
    for i, row in enumerate(rows):
        if set(row) != set(columns):
            fix = f"every row needs the columns of row 0, {columns}: this one has {sorted(map(str, row))}."
            raise invalid(f"{where}[{i}]", "a row", fix)
    try:
        return datasets.Dataset.from_list([dict(row) for row in rows])
    except (pa.ArrowException, ValueError, TypeError, AttributeError, OverflowError, UnicodeError, KeyError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:160]
        fix = f"the rows cannot be stored ({reason}): text as str (UTF-8), labels as int, images as PIL images."
        raise invalid(where, "rows", fix) from None


def _as_split(where: str, name: str, value):
    if isinstance(value, (datasets.Dataset, datasets.IterableDataset)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(row, Mapping) for row in value):
        return _rows_dataset(f"{where}[{name!r}]", value)
    fix = "give a Dataset, an IterableDataset (training only) or a non-empty list of rows (dicts)."
    raise invalid(f"{where}[{name!r}]", type(value).__name__, fix)


def task_splits(t: int, entry, data_args: DataArguments) -> dict:
    """Task t as `{"train": ..., "test": ... or None, ["classes", "name"]}` from what a user may give: a
    `DatasetDict` or dict of splits with any names (`data_args.train_split`, `data_args.eval_split`; while that is
    left at 'test', 'validation' and 'eval' are eval splits too), each a Dataset or a list of rows; or a Dataset or a
    list of rows alone, the training split. A task without an eval split is trained and merged but never scored."""
    where, train = f"tasks[{t}]", data_args.train_split
    if isinstance(entry, (list, tuple, datasets.Dataset, datasets.IterableDataset)):
        entry = {train: entry}
    if not isinstance(entry, Mapping):
        fix = "give a DatasetDict, a dict of splits, a Dataset or a list of rows (dicts) per task."
        raise invalid(where, type(entry).__name__, fix)
    splits = {k: _as_split(where, k, v) for k, v in entry.items() if k not in EXTRA_KEYS}
    if train not in splits:
        fix = f"has no '{train}' split (data_args.train_split; the value shows rows per split)."
        raise invalid(where, _rows(splits), fix)
    names = EVAL_SPLITS if data_args.eval_split == "test" else (data_args.eval_split,)
    found = [n for n in names if n in splits]
    if not found and set(splits) - {train}:
        fix = f"none of its splits is an eval split {list(names)}: set data_args.eval_split to the one to score."
        raise invalid(where, _rows(splits), fix)
    out = {k: entry[k] for k in EXTRA_KEYS if k in entry}
    return {**out, "train": splits[train], "test": splits[found[0]] if found else None}


def task_from_datasets(t: int, entry: dict, processor, data_args: DataArguments) -> tuple[Task, str, dict[int, str]]:
    """Task t from in-memory splits (`task_splits`' form: `{"train": ..., "test": ... or None}`) whose labels are
    global class ids; the task's classes are its training labels (or `entry["classes"]`, required when the training
    split is an `IterableDataset`, which the text path streams). Returns (task, modality, label names by class)."""
    train, evaluation = entry["train"], entry["test"]
    if evaluation is not None and not isinstance(evaluation, datasets.Dataset):
        raise invalid(f"tasks[{t}]", _rows(entry), "its eval split must be a Dataset (only training may stream).")
    columns = train.column_names or (evaluation.column_names if evaluation is not None else [])
    where = f"tasks[{t}]"
    if columns and data_args.text_column not in columns and data_args.image_column not in columns:
        fix = f"neither it nor image_column = {data_args.image_column!r} is a column of {where}: {columns[:6]}."
        raise invalid("text_column", data_args.text_column, fix)
    modality = "text" if data_args.text_column in columns else "image"
    labels = {}
    for split, ds in (("test", evaluation), ("train", train)):
        if isinstance(ds, datasets.Dataset):
            labels[split] = labels_of(ds, data_args.label_column, split, where)
    classes = sorted(entry["classes"]) if "classes" in entry else np.unique(labels.get("train", [])).tolist()
    untrained = sorted(set(labels.get("test", np.array([], int)).tolist()) - set(classes))
    if untrained:  # the head would have no row for them (or one never trained)
        fix = f"its eval split holds classes {untrained[:5]} that its training split lacks: drop those rows."
        raise invalid(where, _rows(entry), fix)
    if "train" not in labels and (modality != "text" or "classes" not in entry):
        fix = "a streamed training split needs text data and `classes`: the task's class ids."
        raise invalid(where, _rows(entry), fix)
    feature = (evaluation if evaluation is not None else train).features[data_args.label_column]
    names = dict(enumerate(feature.names)) if isinstance(feature, datasets.ClassLabel) else {}
    prepare = lambda ds: _prepare(ds, modality, processor, data_args, 0, f"Preparing task {t}")  # noqa: E731
    name = f"task_{t}: " + _summary(classes, [names.get(c, str(c)) for c in range(max(classes) + 1)])
    return Task(name, classes, prepare(train), None if evaluation is None else prepare(evaluation)), modality, names


def split_holdout(train, fraction: float, seed: int, field: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the training data without its held-out part, the held-out part): a seeded `fraction` of the rows; `field`
    names the knob that set the fraction in the error for a streamed split."""
    if isinstance(train, datasets.IterableDataset):
        raise invalid(field, fraction, "needs a training split that is not streamed.")
    parts = train.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]
