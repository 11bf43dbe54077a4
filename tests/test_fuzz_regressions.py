"""The bugs the fuzzed table found (scripts/reliability_tables/fuzz.py), each as its minimal example: the input that
escaped the contract (a raw exception, an error line whose field is not one word, a batch that failed after the
data validated) is now refused by it."""

import contextlib
import io
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pm_hf.commands.cli import main
from pm_hf.config.groups import DataArguments, PMConfig
from pm_hf.data.streams import build_task_stream, task_from_datasets, task_splits
from pm_hf.errors import InputError
from pm_hf.testing import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from reliability_tables.common import ERROR_LINE  # noqa: E402


def check(tmp_path: Path, config: dict, *flags: str) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["check", str(path), *flags])
    except SystemExit as exit_:
        code = exit_.code
    return code, err.getvalue()


@pytest.mark.parametrize(
    ("config", "flags", "field"),
    [
        ({"a b": 1}, (), "'a\\x20b'"),  # a YAML key with a space
        ({}, ("--lr\tx=2",), "'--lr\\tx'"),  # a flag with a tab (the line was cut into two words)
        ({"r\u2028": 1}, (), "'r\\u2028'"),  # a line separator: the error was two lines
    ],
)
def test_an_unknown_name_with_spaces_is_one_field_of_one_line(tmp_path, config, flags, field):
    code, stderr = check(tmp_path, {"output_dir": str(tmp_path / "out"), **config}, *flags)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    match = ERROR_LINE.match(lines[0])
    assert match and match.group(1) == field, lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # nothing written


def test_a_trainer_combination_error_names_its_field(tmp_path):
    """TrainingArguments' own checks were reported as `training arguments = None: ...` (two words, no value)."""
    with pytest.raises(InputError, match=r"^fp16 = True: At most one of fp16 and bf16"):
        PMConfig(output_dir=str(tmp_path / "out"), use_cpu=True, fp16=True, bf16=True)
    code, stderr = check(tmp_path, {"output_dir": str(tmp_path / "out"), "use_cpu": True, "fp16": True, "bf16": True})
    assert code == 2 and ERROR_LINE.match(stderr.strip()).group(1) == "fp16", stderr


def rows(*extra: dict) -> list[dict]:
    return [{"text": "a", "label": 0}, {"text": "b", "label": 1}, *extra]


def prepared(entry: dict, processor=None):
    args = DataArguments()
    return task_from_datasets(0, task_splits(0, entry, args), processor, args)


@pytest.mark.parametrize(
    ("extra", "raised_before"),
    [
        ({"text": "a\ud800b", "label": 0}, "UnicodeEncodeError"),  # a lone surrogate: not UTF-8
        ({"text": "c", "label": 10**30}, "OverflowError"),  # an int beyond 64 bits
        ({"text": 3, "label": 1}, "ArrowTypeError"),  # a number among texts
        ({"image": 3, "label": 1}, "AttributeError"),  # a number among images
    ],
)
def test_rows_arrow_cannot_hold_are_refused(extra, raised_before):
    first = [{"image": Image.new("L", (2, 2)), "label": 0}] if "image" in extra else rows()
    with pytest.raises(InputError, match=r"^tasks\[0\]\['train'\] = 'rows': the rows cannot be stored"):
        task_splits(0, {"train": [*first, extra]}, DataArguments())


def test_an_image_path_that_is_no_image_is_refused():
    """A string among PIL images is stored as a path; reading it raised FileNotFoundError from the check."""
    images = [{"image": Image.new("L", (2, 2)), "label": 0}, {"image": "no-such.png", "label": 1}]
    with pytest.raises(InputError, match=r"^image_column = 'image': row 1 of task 0 is not an image"):
        prepared({"train": images})


@pytest.mark.parametrize("extra", [{"text": "c"}, {"text": "c", "label": 1, "lable": 1}])
def test_a_row_missing_or_adding_a_column_is_refused(extra):
    """A row without `label` raised TypeError/KeyError; one with a stray column was silently cut to row 0's."""
    with pytest.raises(InputError, match=r"^tasks\[0\]\['train'\]\[2\] = 'a row': every row needs the columns"):
        task_splits(0, {"train": rows(extra)}, DataArguments())


def test_a_text_column_of_numbers_is_refused(tmp_path):
    """Texts that are all numbers (a Dataset from rows, a CSV of digits) are int64: the tokenizer raised ValueError."""
    with pytest.raises(InputError, match=r"^text_column = 'text': holds Value\('int64'\) values in task 0, not text"):
        prepared({"train": [{"text": 7, "label": 0}, {"text": 8, "label": 1}]})
    files = {}
    for split in ("train", "test"):
        files[split] = str(tmp_path / f"{split}.csv")
        pd.DataFrame({"text": [10, 11, 12, 13], "label": [0, 1, 0, 1]}).to_csv(files[split], index=False)
    with pytest.raises(InputError, match=r"^text_column = 'text': holds Value\('int64'\) values in task 0 \(train\)"):
        build_task_stream(
            DataArguments(dataset_name="csv", data_files=files, num_tasks=1), tiny_tokenizer(tmp_path, ["a"])
        )


def test_an_empty_dataset_split_is_refused():
    with pytest.raises(InputError, match=r"^tasks\[0\] = \"'train' split\": has no rows"):
        prepared({"train": datasets.Dataset.from_list([])})


def test_an_eval_split_without_the_label_column_is_refused():
    evaluation = datasets.Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(InputError, match=r"^label_column = 'label': not a column of the 'test' split of tasks\[0\]"):
        prepared({"train": rows(), "test": evaluation})


@pytest.mark.parametrize(
    "second",
    [Image.new("L", (5, 4)), Image.new("RGB", (4, 4)), Image.new("LA", (4, 4))],
    ids=["size", "mode", "mode-converted"],
)
def test_images_the_collator_cannot_stack_are_refused(second):
    """With no image processor, images of another size or mode validated and the first batch's stack failed."""
    images = [{"image": Image.new("L", (4, 4)), "label": 0}, {"image": second, "label": 1}]
    with pytest.raises(InputError, match=r"^image_column = 'image': row 1 of task 0 gives a \[\d+, \d+, \d+\] image"):
        prepared({"train": images})
    same = [{"image": Image.new("L", (4, 4)), "label": c} for c in (0, 1)]
    task, modality, _ = prepared({"train": same})
    assert modality == "image" and task.train[0]["pixel_values"].shape == (1, 4, 4)


def test_parquet_images_of_two_sizes_are_refused_by_the_stream(tmp_path):
    files = {}
    for split in ("train", "test"):
        images = [np.zeros((4, 4 + (i == 3)), np.uint8).tolist() for i in range(4)]
        files[split] = str(tmp_path / f"{split}.parquet")
        pd.DataFrame({"image": images, "label": [0, 1, 0, 1]}).to_parquet(files[split])
    with pytest.raises(InputError, match=r"^image_column = 'image': row \d of task 0 \(\w+\) gives a \[1, 4, 5\]"):
        build_task_stream(DataArguments(data_files=files, num_tasks=1), None)


def test_a_file_its_builder_cannot_read_is_one_line_on_stderr(tiny_models, tmp_path):
    """JSON lines under the 'parquet' builder: datasets logged its own error line before ours (two lines on stderr;
    `redirect_stderr` alone does not see it, the fuzzer's `run_cli` moves the logging handlers too)."""
    from reliability_tables.common import base_config
    from reliability_tables.fuzz import run_cli

    files = {}
    for split in ("train", "test"):
        files[split] = str(tmp_path / f"{split}.json")
        pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_json(files[split], orient="records", lines=True)
    config = base_config(tiny_models, tmp_path / "out", data_files=files, class_groups=[[0, 1]])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, _, stderr = run_cli(["check", str(tmp_path / "c.yaml")])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert ERROR_LINE.match(lines[0]).group(1) == "data_files" and "Parquet magic bytes" in lines[0]


def _files(tmp_path: Path, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    train.to_parquet(files["train"])
    test.to_parquet(files["test"])
    return files


def test_a_label_cell_left_empty_is_refused(tmp_path):
    """An integer label column with an empty cell (nullable Int64 in parquet): `np.asarray(..., int64)` raised
    TypeError (found by the full reliability run, whose imports changed the generated cases)."""
    train = pd.DataFrame({"text": list("abcd"), "label": pd.array([0, 1, None, 1], dtype="Int64")})
    files = _files(tmp_path, train, pd.DataFrame({"text": list("ab"), "label": [0, 1]}))
    with pytest.raises(InputError, match=r"^label_column = 'label': row 2 of the 'train' split .* has no class id"):
        build_task_stream(DataArguments(data_files=files, num_tasks=1), tiny_tokenizer(tmp_path, ["a"]))


def test_a_task_whose_eval_split_is_empty_is_refused(tmp_path):
    """The test split lacks the last task's classes: its prepared eval split had no rows and no columns, and the check
    of the task's classes raised `ValueError: Column 'labels' doesn't exist`."""
    train = pd.DataFrame({"text": list("abcdef"), "label": [0, 1, 2, 3, 0, 1]})
    files = _files(tmp_path, train, pd.DataFrame({"text": list("ab"), "label": [0, 1]}))
    args = DataArguments(data_files=files, class_groups=[[0, 1], [2, 3]])
    with pytest.raises(InputError, match=r"^class_groups = .*task 1's classes \['2', '3'\] have no rows in the 'test'"):
        build_task_stream(args, tiny_tokenizer(tmp_path, ["a"]))


# ---------------------------------------------------------------------------- through ContinualTrainer (a model loads)
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from reliability_tables.fuzz import prepare
    from reliability_tables.fuzz_api import tiny_vit_folder

    folder = tmp_path_factory.mktemp("models")
    return {"vit": tiny_vit_folder(str(folder)), **prepare(folder)}


@pytest.mark.parametrize(
    ("mode", "size", "says"), [("L", 8, "takes 3 channels"), ("RGB", 6, "takes \\[8, 8\\] pixels")]
)
def test_images_the_model_cannot_take_are_refused_before_training(tiny_models, tmp_path, monkeypatch, mode, size, says):
    """Found by the fuzzer: 1-channel images for a 3-channel ViT (or 6x6 ones for its 8x8 position embeddings) with no
    image processor validated, and the first forward failed. Now refused from the model's config before the model is
    loaded (the API given its path; a model object is checked from its `config`), and by `pm-hf check`; images that
    fit build."""
    from transformers import ViTForImageClassification

    from pm_hf.continual import ContinualTrainer

    loads = []
    real = ViTForImageClassification.from_pretrained.__func__
    monkeypatch.setattr(ViTForImageClassification, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))  # fmt: skip
    args = PMConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    images = [{"image": Image.new(mode, (size, size)), "label": c} for c in (0, 1)]
    match = rf"^data_args\.image_column = 'image': task 0's train images are \[\d, {size}, {size}\]; the model ({says})"
    with pytest.raises(InputError, match=match):
        _ = ContinualTrainer(model=tiny_models["vit"], args=args, tasks=[{"train": images, "test": images}]).stream
    assert not loads and not (tmp_path / "out").exists()
    files = {}
    for split in ("train", "test"):
        files[split] = str(tmp_path / f"{split}.parquet")
        pixels = np.zeros((size, size, 3) if mode == "RGB" else (size, size), np.uint8).tolist()
        pd.DataFrame({"image": [pixels, pixels], "label": [0, 1]}).to_parquet(files[split])
    config = {"model_name_or_path": tiny_models["vit"], "data_files": files, "num_tasks": 1, "use_cpu": True,
              "output_dir": str(tmp_path / "out")}  # fmt: skip
    code, stderr = check(tmp_path, config)
    assert code == 2 and ERROR_LINE.match(stderr.strip()).group(1) == "image_column", stderr
    good = [{"image": Image.new("RGB", (8, 8)), "label": c} for c in (0, 1)]
    stream = ContinualTrainer(model=tiny_models["vit"], args=args, tasks=[{"train": good, "test": good}]).stream
    assert stream.tasks[0].train[0]["pixel_values"].shape == (3, 8, 8)


def test_a_bad_later_task_is_refused_before_anything_is_written(tiny_models, tmp_path):
    """Found by the fuzzer: a later task was checked after the model's load, whose Trainer had made output_dir (fixed
    in pm_hf/continual.py by the doors branch: every task is checked before the load)."""
    from pm_hf.continual import ContinualTrainer

    out = tmp_path / "out"
    args = PMConfig(output_dir=str(out), use_cpu=True, report_to="none")
    bad = [{"text": "c", "label": -1}, {"text": "d", "label": 2}]
    with pytest.raises(InputError, match="label_column"):
        _ = ContinualTrainer(model=tiny_models["model"], args=args, tasks=[{"train": rows()}, {"train": bad}]).stream
    assert not out.exists()
