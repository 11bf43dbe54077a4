"""Task streams: class splits, caps, global labels, per-task datasets, collation, images, and error messages."""

import contextlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_tokenizer
from PIL import Image

from pm_hf.config.groups import DataArguments
from pm_hf.data.streams import build_task_stream

ROOT = Path(__file__).resolve().parents[1]
WORDNET = ROOT / "data" / "wordnet_supersense10"
WORDS = "alpha beta gamma delta river stone green small house tree bird fish cloud light".split()


def write_text(folder: Path, n_classes: int, n_train: int = 6, n_test: int = 3, names=None, seed: int = 0) -> dict:
    """A text dataset with labels 0..n_classes-1 (optionally a label_name column) as train/test parquet files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            {"text": " ".join(rng.choice(WORDS, size=rng.integers(1, 9))), "label": c}
            for c in range(n_classes)
            for _ in range(n)
        ]
        if names is not None:
            rows = [{**r, "label_name": names[r["label"]]} for r in rows]
        files[split] = str(folder / f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(files[split])
    return files


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [*pd.read_parquet(WORDNET / "train.parquet").text[:300], *WORDS]
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts)


def labels_of(ds) -> np.ndarray:
    return np.asarray(ds["labels"])


def test_wordnet_class_split_caps_and_global_labels(tok):
    files = {s: str(WORDNET / f"{s}.parquet") for s in ("train", "test")}
    args = DataArguments(
        data_files=files, num_tasks=5, max_train_samples_per_class=8, max_eval_samples_per_class=4, max_length=24
    )
    stream = build_task_stream(args, tok, seed=0)
    assert stream.modality == "text" and stream.num_classes == 10
    assert stream.label_names[:3] == ["act", "animal", "artifact"]
    assert [t.classes for t in stream.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert stream.tasks[0].name == "task_0: act, animal"
    raw = pd.read_parquet(files["train"])
    for task in stream.tasks:
        assert set(task.train.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        for ds, cap in ((task.train, 8), (task.eval, 4)):
            classes, counts = np.unique(labels_of(ds), return_counts=True)
            assert classes.tolist() == task.classes and counts.tolist() == [cap, cap]  # global ids, capped
        assert max(len(x) for x in task.train["input_ids"]) <= 24
    # rows are the raw rows with their own labels: re-tokenizing the raw text of the selected rows matches
    first = stream.tasks[3].train[0]
    match = [
        i
        for i, text in enumerate(raw.text)
        if tok(text, truncation=True, max_length=24)["input_ids"] == first["input_ids"].tolist()
    ]
    assert match and raw.label[match[0]] == first["labels"].item() == 6
    again = build_task_stream(args, tok, seed=0)
    other = build_task_stream(args, tok, seed=1)
    ids = lambda s: [x.tolist() for x in s.tasks[2].train["input_ids"]]
    assert ids(again) == ids(stream) and ids(other) != ids(stream)  # seeded, deterministic caps


def test_class_order_seed_and_explicit_groups(tok, tmp_path):
    files = write_text(tmp_path / "d", n_classes=7)
    args = DataArguments(data_files=files, num_tasks=3, class_order_seed=3)
    groups = [t.classes for t in build_task_stream(args, tok).tasks]
    assert groups == [t.classes for t in build_task_stream(args, tok).tasks]
    assert [len(g) for g in groups] == [3, 2, 2]  # np.array_split: the first groups take the remainder
    assert sorted(c for g in groups for c in g) == list(range(7))
    assert groups != [[0, 1, 2], [3, 4], [5, 6]]
    assert [t.classes for t in build_task_stream(DataArguments(data_files=files, num_tasks=3), tok).tasks] == [
        [0, 1, 2],
        [3, 4],
        [5, 6],
    ]
    stream = build_task_stream(DataArguments(data_files=files, class_groups=[[5, 1], [3, 0]]), tok)
    assert stream.num_classes == 7 and stream.label_names == [str(c) for c in range(7)]
    assert [t.classes for t in stream.tasks] == [[1, 5], [0, 3]]
    assert sorted(set(labels_of(stream.tasks[0].train))) == [1, 5] and len(stream.tasks[0].train) == 12
    assert set(labels_of(stream.tasks[1].eval)) == {0, 3} and len(stream.tasks[1].eval) == 6


def test_task_incremental_offsets_and_domain_incremental_keeps(tok, tmp_path):
    a = write_text(tmp_path / "a", 3, names=["red", "green", "blue"])
    b = write_text(tmp_path / "b", 2, seed=1)
    specs = [{"data_files": a}, {"dataset_name": "parquet", "data_files": b}]
    stream = build_task_stream(DataArguments(task_datasets=specs, scenario="task_incremental"), tok)
    assert stream.num_classes == 5 and stream.label_names == ["red", "green", "blue", "0", "1"]
    assert [t.classes for t in stream.tasks] == [[0, 1, 2], [3, 4]]
    assert stream.tasks[1].name == "task_1: b (0, 1)"  # a multi-dataset stream names the dataset
    assert sorted(set(labels_of(stream.tasks[1].train))) == [3, 4] and sorted(set(labels_of(stream.tasks[1].eval))) == [
        3,
        4,
    ]
    c = write_text(tmp_path / "c", 3, seed=2)
    domain = build_task_stream(
        DataArguments(
            task_datasets=[{"data_files": a}, {"data_files": c}],
            scenario="domain_incremental",
            max_train_samples_per_class=2,
        ),
        tok,
    )
    assert domain.num_classes == 3 and domain.label_names == ["red", "green", "blue"]
    assert [t.classes for t in domain.tasks] == [[0, 1, 2], [0, 1, 2]]
    assert domain.tasks[1].name == "task_1: c"  # a generic train file is named by its folder
    for task in domain.tasks:
        assert np.unique(labels_of(task.train), return_counts=True)[1].tolist() == [2, 2, 2]


def test_collate_pads_a_batch(tok, tmp_path):
    stream = build_task_stream(DataArguments(data_files=write_text(tmp_path / "d", 2), num_tasks=1), tok)
    rows = [stream.tasks[0].train[i] for i in range(6)]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1  # the batch really needs padding
    batch = stream.collate_fn(rows)
    assert batch["input_ids"].shape == (6, max(lengths)) and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [r["labels"].item() for r in rows]
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == rows[i]["input_ids"].tolist()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)


def test_image_parquet_and_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"image": rng.integers(0, 256, (8, 8)).tolist(), "label": c} for c in range(4) for _ in range(n)]
        files[split] = str(tmp_path / f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(files[split])
        for name in ("cat", "dog", "owl"):
            (tmp_path / "imf" / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imf" / split / name / f"{i}.png")
    stream = build_task_stream(DataArguments(data_files=files, num_tasks=2), None)
    assert stream.modality == "image" and stream.num_classes == 4
    task = stream.tasks[1]
    assert set(task.train.column_names) == {"pixel_values", "labels"}  # survives Trainer's remove_unused_columns
    batch = stream.collate_fn([task.train[i] for i in range(len(task.train))])
    assert batch["pixel_values"].shape == (6, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    raw = np.asarray(pd.read_parquet(files["train"]).image[6].tolist(), dtype=np.float32) / 255
    assert torch.allclose(batch["pixel_values"][0, 0], torch.from_numpy(raw))
    assert batch["labels"].tolist() == [2, 2, 2, 3, 3, 3] == labels_of(task.train).tolist()
    folder = {s: str(tmp_path / "imf" / s / "**") for s in ("train", "test")}
    stream = build_task_stream(DataArguments(dataset_name="imagefolder", data_files=folder, num_tasks=1), None)
    assert stream.label_names == ["cat", "dog", "owl"] and stream.tasks[0].name == "task_0: cat, dog, owl"
    batch = stream.collate_fn([stream.tasks[0].eval[i] for i in range(4)])
    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 6, 6) and 0 <= pixels.min() < pixels.max() <= 1


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_an_image_in_read_only_memory_becomes_a_tensor_of_its_own(dtype):
    from pm_hf.data.images import _fallback_tensor

    array = np.arange(4 * 5).reshape(4, 5).astype(dtype)  # H, W: made [1, H, W] without a copy
    array.flags.writeable = False  # as a PIL image's buffer through np.asarray
    tensor = _fallback_tensor(array)
    expected = torch.from_numpy(array[None].copy()).float()
    assert torch.equal(tensor, expected / 255.0 if dtype == np.uint8 else expected)
    assert not np.shares_memory(tensor.numpy(), array)
    tensor += 1  # writable memory of its own


def test_main_process_first_wraps_loading_and_preprocessing(tok, tmp_path):
    entered = []

    @contextlib.contextmanager
    def first():
        entered.append(True)
        yield

    args = DataArguments(data_files=write_text(tmp_path / "d", 4), num_tasks=2)
    build_task_stream(args, tok, main_process_first=first)
    assert len(entered) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_split": "validation"}, "eval_split = 'validation': not a split"),
        ({"label_column": "y"}, "label_column = 'y': not a column"),
        ({"text_column": "sentence"}, "text_column = 'sentence': neither it nor image_column = 'image'"),
        ({"class_groups": [[0, 42], [7, 1]]}, "class_groups = [[0, 42], [7, 1]]: class ids [7, 42] are not"),
        ({"num_tasks": 4}, "num_tasks = 4: "),
        ({"class_groups": [[0, 1], [2]]}, "class_groups = [[0, 1], [2]]: task 1 has one class (2)"),
        ({"task_datasets": [{"data_files": None, "split": "x"}]}, "task_datasets[0] = {'data_files': None, 'split'"),
        ({"scenario": "domain_incremental"}, "needs one dataset per task"),
    ],
)
def test_errors_name_the_field_and_value(tok, tmp_path, kwargs, message):
    files = write_text(tmp_path / "d", 3)
    with pytest.raises(ValueError) as err:
        build_task_stream(DataArguments(data_files=files, **kwargs), tok)
    assert message in str(err.value)
    if "not a split" in message:
        assert "use one of ['train', 'test']" in str(err.value)
    if "not a column" in message or "neither" in message:
        assert "['text', 'label']" in str(err.value)


def _write_rows(folder: Path, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", train), ("test", test)):
        files[split] = str(folder / f"{split}.parquet")
        pd.DataFrame(rows, columns=["text", "label"]).to_parquet(files[split])
    return files


def test_untrustworthy_data_is_refused(tok, tmp_path):
    ok = [("a b", 0), ("c", 0), ("d e", 1), ("f", 1)]
    cases = {  # what the data does wrong -> the message
        "huge id": (ok + [("g", 1_000_000)], ok, "class ids go up to 1000000"),
        "eval-only class": (ok, ok + [("g", 2)], "holds classes [2] that are never trained"),
        "empty eval split": (ok, [], "test.parquet' holds no rows"),
    }
    for name, (train, test, message) in cases.items():
        files = _write_rows(tmp_path / name.replace(" ", "_"), train, test)
        with pytest.raises(ValueError, match=re.escape(message)):
            build_task_stream(DataArguments(data_files=files, num_tasks=1), tok)
    files = _write_rows(tmp_path / "capped", ok + [("g", 2), ("h", 3)], ok + [("i", 3)])
    with pytest.raises(ValueError, match=re.escape("task 1's classes ['2'] have no rows in the 'test' split")):
        build_task_stream(DataArguments(data_files=files, class_groups=[[0, 1], [2, 3]]), tok)


def test_missing_files_and_bad_data_files_are_named(tok, tmp_path):
    with pytest.raises(ValueError, match=r"data_files = .*'nope/train.parquet' does not exist"):
        build_task_stream(DataArguments(data_files={"train": "nope/train.parquet", "test": "x"}), tok)
    with pytest.raises(ValueError, match=r"data_files = \{'train:x,test:y': None\}: give files per split"):
        DataArguments(data_files={"train:x,test:y": None})  # what YAML makes of '{train:x,test:y}'
    files = write_text(tmp_path / "a", 3)
    pd.DataFrame({"sentence": ["x"], "label": [0]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"data_files = .*could not be read as one dataset"):
        build_task_stream(DataArguments(data_files={"train": [files["train"], str(tmp_path / "other.parquet")],
                                                    "test": files["test"]}), tok)  # fmt: skip


def test_errors_on_labels_and_processor(tok, tmp_path):
    (tmp_path / "d").mkdir()
    for split in ("train", "test"):
        pd.DataFrame({"text": ["a b", "c"], "label": [0.5, 1.0]}).to_parquet(tmp_path / "d" / f"{split}.parquet")
    files = {s: str(tmp_path / "d" / f"{s}.parquet") for s in ("train", "test")}
    with pytest.raises(ValueError, match="label_column = 'label'.*not integer class ids"):
        build_task_stream(DataArguments(data_files=files, num_tasks=1), tok)
    with pytest.raises(ValueError, match="this model has no tokenizer"):
        build_task_stream(DataArguments(data_files=write_text(tmp_path / "e", 2), num_tasks=1), None)


def test_wordnet_readme_rebuild_keeps_sections_after_the_marker():
    """scripts/build_wordnet_data.py regenerates data/README.md but keeps what follows its marker line."""
    spec = importlib.util.spec_from_file_location("build_wordnet_data", ROOT / "scripts" / "build_wordnet_data.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    marker, merge = builder.README_KEPT_MARKER, builder.merge_readme
    assert merge("# Gen\n", None) == merge("# Gen\n", "# Old, no marker\n\n## Lost\n") == f"# Gen\n\n{marker}\n"
    old = f"# Old\n\n{marker}\n\n## Kept\n\nhand-written\n"
    new = merge("# Gen\n", old)
    assert new == f"# Gen\n\n{marker}\n\n## Kept\n\nhand-written\n"
    assert merge("# Gen\n", new) == new
    committed = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    generated = committed.partition(marker)[0].removesuffix("\n")
    assert merge(generated, committed) == committed and "## `digits28`" in committed.partition(marker)[2]
