"""The datasets a task stream is made of: which sources the config names, loading them (Hub ids or local files),
and checking them before anything is trained — files exist, splits and columns exist, labels are class ids in range,
every class of the eval split is also trained — with errors of the form `<field> = <value>: <fix>`."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from ..config.checks import check_data_files, invalid
from ..config.groups import DataArguments

logger = logging.getLogger(__name__)

TASK_DATASET_KEYS = ("dataset_name", "data_files", "dataset_config_name")
LABEL_NAME_COLUMN = "label_name"
FILE_BUILDERS = ("parquet", "csv", "json", "text", "arrow", "imagefolder", "audiofolder")
MAX_CLASS_ID = 1024  # ids may leave gaps up to max(4 x the classes present, this): a head row per id up to the largest


@dataclass
class Source:
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


def _task_spec(i: int, entry, data_args: DataArguments) -> dict:
    name = f"task_datasets[{i}]"
    if not isinstance(entry, dict):
        raise invalid(name, entry, f"give a mapping with keys {list(TASK_DATASET_KEYS)}.")
    unknown = sorted(set(entry) - set(TASK_DATASET_KEYS))
    if unknown:
        raise invalid(name, entry, f"unknown keys {unknown}; the keys are {list(TASK_DATASET_KEYS)}.")
    check_data_files(f"{name}.data_files", entry.get("data_files"))
    return {
        "dataset_name": entry.get("dataset_name", data_args.dataset_name),
        "data_files": entry.get("data_files"),
        "dataset_config_name": entry.get("dataset_config_name"),
    }


def source_specs(data_args: DataArguments) -> list[dict]:
    """One {dataset_name, data_files, dataset_config_name} per source: the top-level dataset, or `task_datasets`."""
    if data_args.task_datasets is None:
        if data_args.scenario == "domain_incremental":
            raise invalid("scenario", data_args.scenario, "needs one dataset per task: set `task_datasets`.")
        specs, prefix = [{k: getattr(data_args, k) for k in TASK_DATASET_KEYS}], ""
    else:
        if not isinstance(data_args.task_datasets, list) or not data_args.task_datasets:
            raise invalid("task_datasets", data_args.task_datasets, "give a non-empty list of datasets.")
        specs = [_task_spec(i, e, data_args) for i, e in enumerate(data_args.task_datasets)]
        if data_args.class_groups is not None:
            logger.warning("`class_groups` is ignored: `task_datasets` defines the tasks.")
    for i, spec in enumerate(specs):
        prefix = "" if data_args.task_datasets is None else f"task_datasets[{i}]."
        if not isinstance(spec["dataset_name"], str) or not spec["dataset_name"]:
            raise invalid(f"{prefix}dataset_name", spec["dataset_name"], "give a Hub id or a builder name.")
        if spec["dataset_name"] in FILE_BUILDERS:
            _check_local_files(f"{prefix}data_files", spec["data_files"], spec["dataset_name"])
    return specs


def _check_local_files(name: str, files, builder: str) -> None:
    if not files:
        raise invalid(name, files, f"the '{builder}' builder reads local files: give e.g. '{{train: a.{builder}}}'.")
    values = files.values() if isinstance(files, dict) else [files]
    for value in values:
        for pattern in [value] if isinstance(value, str) else value:
            path = os.path.expanduser(pattern)
            if not (glob.has_magic(path) and glob.glob(path)) and not Path(path).exists():
                raise invalid(name, files, f"{pattern!r} does not exist; check the path (relative to {Path.cwd()}).")
            if Path(path).is_dir() and not glob.has_magic(path) and builder not in ("imagefolder", "audiofolder"):
                suffix = {"text": "txt", "arrow": "arrow"}.get(builder, builder)
                fix = f"{pattern!r} is a folder: name its files, e.g. '{pattern}/*.{suffix}'."
                raise invalid(name, files, fix)
            if Path(path).is_file() and _has_no_rows(Path(path)):
                raise invalid(name, files, f"{pattern!r} holds no rows: every split needs data.")


def _has_no_rows(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    return False


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
            raise invalid(arg, column, f"not a column of the '{split}' split of {where}; use one of {ds.column_names}.")


@contextlib.contextmanager
def _errors_unlogged():
    """datasets' own log lines off (its readers log an error before raising it), so a bad file is reported in one
    line, by the error that names the field."""
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(level)


def load_dataset_dict(spec: dict) -> datasets.DatasetDict:
    """`datasets.load_dataset` of one source; loading problems become errors that name the dataset field."""
    field_name = "dataset_name" if spec["dataset_name"] not in FILE_BUILDERS else "data_files"
    value = spec[field_name]
    try:
        with _errors_unlogged():  # a reader's error is logged, then raised: the raised one is reported below
            loaded = datasets.load_dataset(
                spec["dataset_name"], spec["dataset_config_name"], data_files=spec["data_files"]
            )
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        fix = "no local dataset of that name, and it cannot be loaded from the Hub here (offline or not found)"
        raise invalid(field_name, value, f"{fix}: {str(err).splitlines()[0][:200]}") from err
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError, OSError) as err:
        cause = err.__cause__ or err
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0][:200]}" if str(cause) else type(cause).__name__
        raise invalid(field_name, value, f"the files could not be read as one dataset ({reason}).") from err
    return loaded


def load_splits(spec: dict, data_args: DataArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and eval splits of one source, both non-empty."""
    where = describe_source(spec)
    loaded = load_dataset_dict(spec)
    splits = []
    for arg in ("train_split", "eval_split"):
        split = getattr(data_args, arg)
        if split not in loaded:
            raise invalid(arg, split, f"not a split of {where}; use one of {list(loaded)}.")
        if len(loaded[split]) == 0:
            raise invalid(arg, split, f"the '{split}' split of {where} is empty.")
        splits.append(loaded[split])
    return splits[0], splits[1]


def labels_of(ds: datasets.Dataset, column: str, split: str, where: str) -> np.ndarray:
    """The split's class ids (non-negative integers); the split must have rows and the label column."""
    if len(ds) == 0:
        raise invalid(where, f"{split!r} split", "has no rows: every split needs data.")
    if column not in ds.column_names:
        raise invalid("label_column", column, f"not a column of the '{split}' split of {where}; use one of "
                      f"{ds.column_names}.")  # fmt: skip
    feature = ds.features[column]
    dtype = getattr(feature, "dtype", "")
    if not isinstance(feature, datasets.ClassLabel) and not str(dtype).startswith(("int", "uint")):
        raise invalid("label_column", column, f"the '{split}' split of {where} holds {feature}, not integer class ids.")
    values = list(ds[column])
    if None in values:  # an empty cell of an integer column (a CSV or parquet file with a missing label)
        fix = f"row {values.index(None)} of the '{split}' split of {where} has no class id: label or drop it."
        raise invalid("label_column", column, fix)
    labels = np.asarray(values, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise invalid("label_column", column, f"the '{split}' split of {where} holds negative ids (unlabelled?).")
    return labels


def _check_label_range(train: np.ndarray, evl: np.ndarray, feature, data_args: DataArguments, where: str) -> int:
    """The number of classes (head rows) of a source; ids must be class indices, not arbitrary codes."""
    eval_only = sorted(set(np.unique(evl).tolist()) - set(np.unique(train).tolist()))
    if eval_only:
        fix = f"the '{data_args.eval_split}' split of {where} holds classes {eval_only[:5]} that are never trained."
        raise invalid("eval_split", data_args.eval_split, fix + " Drop them from the eval data.")
    if isinstance(feature, datasets.ClassLabel):
        if train.max() >= feature.num_classes:
            raise invalid("label_column", data_args.label_column, f"ids above the ClassLabel's {feature.num_classes}.")
        return feature.num_classes
    present = len(np.unique(train))
    if int(train.max()) + 1 > max(4 * present, MAX_CLASS_ID):
        fix = f"class ids go up to {int(train.max())} but {where} has {present} classes: use ids 0..{present - 1}."
        raise invalid("label_column", data_args.label_column, fix)
    return int(train.max()) + 1


def _first_names(ds: datasets.Dataset, labels: np.ndarray, names: dict[int, str]) -> None:
    classes, first = np.unique(labels, return_index=True)
    values = ds.select_columns([LABEL_NAME_COLUMN]).select(first.tolist())[:][LABEL_NAME_COLUMN]
    for c, value in zip(classes.tolist(), values):
        names.setdefault(int(c), str(value))


def _modality(train: datasets.Dataset, data_args: DataArguments, where: str) -> tuple[str, dict]:
    if data_args.text_column in train.column_names:
        return "text", {"text_column": data_args.text_column, "text_pair_column": data_args.text_pair_column}
    if data_args.image_column in train.column_names:
        return "image", {"image_column": data_args.image_column}
    fix = f"neither it nor image_column = {data_args.image_column!r} is a column of {where}: {train.column_names}."
    raise invalid("text_column", data_args.text_column, fix)


def load_source(spec: dict, data_args: DataArguments) -> Source:
    """Load and check one source: its splits, input and label columns, class ids and label names."""
    where = describe_source(spec)
    train, evl = load_splits(spec, data_args)
    modality, inputs = _modality(train, data_args, where)
    for ds, split in ((train, data_args.train_split), (evl, data_args.eval_split)):
        check_columns(ds, {**inputs, "label_column": data_args.label_column}, split, where)
    train_labels = labels_of(train, data_args.label_column, data_args.train_split, where)
    eval_labels = labels_of(evl, data_args.label_column, data_args.eval_split, where)
    feature = train.features[data_args.label_column]
    num_classes = _check_label_range(train_labels, eval_labels, feature, data_args, where)
    names: dict[int, str] = {}
    for ds, labels in ((train, train_labels), (evl, eval_labels)):
        if LABEL_NAME_COLUMN in ds.column_names and LABEL_NAME_COLUMN != data_args.label_column:
            _first_names(ds, labels, names)
    if isinstance(feature, datasets.ClassLabel):
        names.update({c: n for c, n in enumerate(feature.names) if c not in names})
    short = short_name(spec, data_args.train_split)
    return Source(where, short, modality, train, evl, train_labels, eval_labels, num_classes, names)
