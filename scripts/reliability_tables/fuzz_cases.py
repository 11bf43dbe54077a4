"""The Hypothesis strategies of the fuzzed table (`fuzz.py`): YAML configs over the real fields of the six argument
groups (values of the field's type, of other types, edge numbers, missing and unknown fields), command-line flags,
odd config files, and the data they name (empty splits, label gaps, negative or non-integer labels, missing and extra
columns, non-UTF-8 and huge text); and Python task inputs for `ContinualTrainer` (rows, Datasets, images of odd modes
and sizes)."""

from __future__ import annotations

import dataclasses
import math
import typing
from functools import cache

from hypothesis import strategies as st

from .common import _DROP

# Text without lone surrogates (YAML and parquet cannot hold them); non-UTF-8 bytes are written separately.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
EDGE_INTS = st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 2**31, 2**63 - 1, 10**30])
EDGE_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 1e-300, 1e300, 0.5, 1.0, -1.0])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), EDGE_INTS, EDGE_FLOATS, TEXT)
ANYTHING = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                        max_leaves=6)  # fmt: skip

# Fields whose values reach beyond the case folder or the machine (paths read anywhere, the Hub, launchers, devices):
# they are fuzzed with the values below only, or left alone.
LEFT_ALONE = {"hub_token", "push_to_hub_token", "logging_dir", "deepspeed", "fsdp_config", "accelerator_config",
              "output_dir", "resume_from", "model_name_or_path", "data_files", "task_datasets", "debug",
              "local_rank", "ddp_backend", "hub_model_id", "push_to_hub", "torch_compile", "torch_compile_backend",
              "torch_compile_mode", "use_cpu", "report_to", "trackio_space_id", "project",
              "parallelism_config"}  # fmt: skip
CHOICES = {
    "merge_method": ["pm", "seq", "seq-merge", "average", "coma", "cofima", "task-arithmetic", "ties", "magmax",
                     "oracle-alpha", "joint", "nope"],
    "alpha_calibration": ["none", "secant", "branch", "curve", "nope"],
    "alpha_granularity": ["global", "module", "nope"],
    "fisher_normalize": ["none", "mean", "nope"],
    "scenario": ["class_incremental", "task_incremental", "domain_incremental", "nope"],
    "model_task": ["auto", "sequence_classification", "image_classification", "causal_lm"],
    "dtype": ["float32", "bfloat16", "float16"],
    "primary_metric": ["rougeL", "exact_match", "bleu"],
    "hub_strategy": ["every_task", "end", "checkpoint"],
    "text_column": ["text", "image", "label", "nope"],
    "label_column": ["label", "text", "label_name", "nope"],
    "image_column": ["image", "text", "nope"],
    "text_pair_column": ["text", "label_name", "nope"],
    "train_split": ["train", "test", "nope"],
    "eval_split": ["test", "train", "nope"],
    "lr_scheduler_type": ["linear", "cosine", "constant", "nope"],
    "optim": ["adamw_torch", "sgd", "adafactor", "nope"],
    "eval_strategy": ["no", "steps", "epoch"],
    "save_strategy": ["no", "steps", "epoch", "best"],
    "logging_strategy": ["no", "steps", "epoch"],
    "preset": ["pm", "pm-proto", "nope"],
    "target_modules": [["query"], ["value", "key"], ["nope"], ["dense"]],
    "modules_to_save": [["pooler"], ["classifier"], ["nope"]],
    "class_groups": [[[0, 1], [2, 3], [4, 5]], [[0, 1, 2], [3, 4, 5]], [[0, 1], [2, 3]], [[0], [1, 2]],
                     [[0, 1], [1, 2]], [[0, 9]], [[0, 1], []], [], [[-1, 2]], [[0.5, 1]]],
}  # fmt: skip


def _base(hint):
    """(the plain type of a hint, whether it may be None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) or (
        args and type(None) in args
    ):
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else hint), type(None) in args
    return hint, False


def _typed(hint, metadata: dict) -> st.SearchStrategy:
    """Values of the field's own type (plausible ones and edge ones)."""
    base, optional = _base(hint)
    origin = typing.get_origin(base) or base
    if metadata.get("choices"):
        strategy = st.sampled_from([*metadata["choices"], "nope"])
    elif base is bool:
        strategy = st.booleans()
    elif base is int:
        strategy = st.integers(-3, 64) | EDGE_INTS
    elif base is float:
        strategy = st.floats(-2, 2) | EDGE_FLOATS | st.integers(0, 3)
    elif base is str:
        strategy = TEXT
    elif origin is list:
        (item,) = typing.get_args(base) or (None,)
        inner = st.floats(0, 1) if item is float else st.integers(-2, 8) if item is int else TEXT
        strategy = st.lists(inner, max_size=4)
    elif origin is dict:
        strategy = st.dictionaries(TEXT, SCALARS, max_size=2)
    else:
        strategy = SCALARS
    return strategy | st.none() if optional else strategy


@cache
def config_fields() -> dict[str, st.SearchStrategy]:
    """Every field of the six argument groups (TrainingArguments' included) that can be fuzzed here -> its values."""
    from pm_hf.commands.parsing import DATACLASSES

    out = {}
    for dtype in DATACLASSES:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if not f.init or f.name in LEFT_ALONE or f.name.startswith("_"):
                continue
            typed = st.sampled_from(CHOICES[f.name]) if f.name in CHOICES else _typed(hints[f.name], dict(f.metadata))
            out[f.name] = st.one_of(typed, typed, typed, typed, ANYTHING)  # mostly the field's own type
    return out


@st.composite
def field_changes(draw, max_fields: int = 4) -> dict:
    """Some fields of the config changed, dropped, or unknown ones added."""
    fields = config_fields()
    names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=max_fields, unique=True))
    changes = {name: draw(fields[name]) for name in names}
    if draw(st.integers(0, 3)) == 0:  # a field left out (its default then applies)
        changes[draw(st.sampled_from(["class_groups", "max_length", "r", "learning_rate", "fisher_max_samples"]))] = (
            _DROP
        )
    if draw(st.integers(0, 9)) == 0:
        changes[draw(TEXT.filter(bool))] = draw(SCALARS)  # an unknown (or misspelled) field
    if draw(st.integers(0, 29)) == 0:
        changes["alpha"] = draw(SCALARS)  # a renamed field
    return changes


def flag_text(value) -> str:
    """How a user would type `value` after its flag."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return "" if value is None else str(value)


@st.composite
def flags(draw, changes: dict) -> list[str]:
    """Move some changed fields to command-line flags (`--f v` or `--f=v`); sometimes a stray token."""
    tokens = []
    for name in sorted(changes):
        value = changes[name]
        if value is _DROP or not draw(st.booleans()):
            continue
        del changes[name]
        text = flag_text(value)
        tokens += [f"--{name}={text}"] if draw(st.booleans()) else [f"--{name}", text]
    if draw(st.integers(0, 14)) == 0:
        tokens.append(draw(st.sampled_from(["--", "-x", "stray", "--resume", "--preset", "--output_dir"])))
    return tokens


# --------------------------------------------------------------------------------------------------- the data
LABELS = st.one_of(
    st.integers(0, 5),
    st.sampled_from([0, 1, 2, 3, 4, 5, 7, 40, -1, 5000]),  # gaps, negative, far beyond the classes present
)


@st.composite
def data_frames(draw) -> dict:
    """A (train, test) pair of row lists, in some file format: how users' data goes wrong."""
    n_classes = draw(st.integers(1, 6))
    label = LABELS if draw(st.integers(0, 3)) == 0 else st.integers(0, n_classes - 1)
    label = st.one_of(label, st.sampled_from([None, 1.5, "cat", True])) if draw(st.integers(0, 9)) == 0 else label
    text = st.one_of(TEXT, st.sampled_from(["", " ", "word " * 5000, "\x00", "é" * 3, "🙂"]))
    text = st.integers(0, 99) if draw(st.integers(0, 7)) == 0 else text  # texts that are all numbers
    columns = ["text", "label"]
    drop = draw(st.sampled_from([None, None, None, None, "text", "label"]))
    extra = draw(st.sampled_from([None, None, "label_name", "extra", "image"]))
    out = {"format": draw(st.sampled_from(["parquet", "parquet", "csv", "json"]))}
    out["builder"] = draw(st.sampled_from([out["format"], out["format"], None]))  # None: base_config's 'parquet'
    for split in ("train", "test"):
        n = draw(st.integers(0, 16))
        rows = []
        for i in range(n):
            row = {"text": draw(text), "label": draw(label) if i >= n_classes else i % n_classes}
            if extra is not None:
                row[extra] = draw(SCALARS) if extra == "extra" else f"name{row['label']}"
            rows.append({k: v for k, v in row.items() if k != drop})
        out[split] = rows
    out["columns"] = [c for c in columns if c != drop]
    out["non_utf8"] = out["format"] == "csv" and draw(st.integers(0, 3)) == 0
    return out


@st.composite
def config_cases(draw, data: bool = True) -> dict:
    """One case of the check door: the config's changes, its flags, the file's form, maybe generated data."""
    changes = draw(field_changes())
    case = {"changes": changes, "flags": draw(flags(changes)), "form": "yaml", "data": None, "out": "new"}
    case["form"] = draw(st.sampled_from(["yaml"] * 20 + ["bytes", "list", "scalar", "empty", "twice"]))
    case["out"] = draw(st.sampled_from(["new"] * 6 + ["file", "under-file", "empty-dir", "odd-name"]))
    if data and draw(st.integers(0, 3)) == 0:
        case["data"] = draw(data_frames())
    return case


# ------------------------------------------------------------------------------------------ Python task inputs
@st.composite
def image_values(draw):
    """An image as a user may give it: PIL of any mode and size, nested lists, arrays of odd shapes."""
    import numpy as np
    from PIL import Image

    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I", "F", "CMYK", "LA", "list", "array3", "array4d"]))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    if kind == "list":
        return rng.integers(0, 256, (h, w)).tolist()
    if kind == "array3":
        return rng.integers(0, 256, (h, w, draw(st.sampled_from([1, 2, 3, 4, 5]))), dtype=np.uint8)
    if kind == "array4d":
        return rng.integers(0, 256, (1, h, w, 1), dtype=np.uint8)
    return Image.new(kind, (w, h), color=draw(st.integers(0, 255)) if kind not in ("CMYK",) else None)


@st.composite
def api_tasks(draw, image: bool = False) -> dict:
    """Tasks for `ContinualTrainer(tasks=...)`: lists of rows or Datasets; half of the cases clean (valid), the
    others with one or more of the ways they go wrong (odd values, label gaps, missing or extra columns, empty or
    missing splits, junk in place of a split or a task)."""
    clean = draw(st.booleans())
    odd = (lambda p: False) if clean else (lambda p: draw(st.integers(0, p - 1)) == 0)
    key = "image" if image else "text"
    value = image_values() if image else TEXT
    if odd(2):
        value = value | (st.sampled_from([{}, 3]) if image else st.sampled_from(["", "word " * 3000, "a\ud800b", 7]))
    tasks, next_class = [], 0
    for _ in range(draw(st.integers(1, 3))):
        classes = list(range(next_class, next_class + draw(st.integers(2, 3))))
        next_class = classes[-1] + 1
        if odd(3):
            classes = draw(st.lists(st.sampled_from([0, 1, 2, 5, 9, 40, -1, 2000]), max_size=3, unique=True))
        labels = st.sampled_from(classes) if classes else st.just(0)
        if odd(6):
            labels = st.sampled_from([1.5, "x", None, True])
        splits = ("train", "test")
        if odd(3):
            splits = draw(st.sampled_from([("train",), ("train", "validation"), ("test",), ("train", "other")]))
        entry = {}
        for split in splits:
            rows = [{key: draw(value), "label": c} for c in classes]
            rows += [{key: draw(value), "label": draw(labels)} for _ in range(draw(st.integers(0, 5)))]
            if odd(6) and rows:
                rows[0] = {k: v for k, v in rows[0].items() if k != draw(st.sampled_from([key, "label"]))}
            if odd(6) and rows:
                rows[-1] = {**rows[-1], "extra": draw(SCALARS)}
            form = draw(st.sampled_from(["rows", "dataset"] + (["empty", "junk"] if odd(3) else [])))
            entry[split] = {"rows": rows, "form": form}
        tasks.append({"form": draw(st.sampled_from(["none", "str", "int"]))} if odd(8) else entry)
    return {"tasks": tasks, "image": image}
