"""The api door of the fuzzed table: generated task inputs (`fuzz_cases.api_tasks`) given to `ContinualTrainer`.
Building the trainer's stream (its validation: `task_splits`, `task_from_datasets`) raises `InputError` or nothing;
a stream that builds collates a batch of every task's splits, which the model takes."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def tiny_vit_folder(folder: str) -> str:
    """A tiny 3-channel ViT saved without an image processor (the built-in [0, 1] transform is used)."""
    from transformers import ViTConfig, ViTForImageClassification

    path = Path(folder) / "vit"
    if not path.exists():
        config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=16, num_labels=2)  # fmt: skip
        ViTForImageClassification(config).save_pretrained(path)
    return str(path)


def _split(spec: dict):
    import datasets

    rows, form = spec["rows"], spec["form"]
    if form == "empty":
        return []
    if form == "junk":
        return "not a split"
    if form == "dataset":
        try:
            return datasets.Dataset.from_list(rows)
        except Exception:  # noqa: BLE001 - rows a Dataset cannot hold: given as rows instead
            return rows
    return rows


def _task(entry: dict):
    form = entry.get("form")
    if form is not None:
        return {"none": None, "str": "train.parquet", "int": 3}[form]
    return {name: _split(spec) for name, spec in entry.items()}


def _batches_run(trainer) -> None:
    """A batch of every task's splits through the collator, and for text through the model (what training does
    first). Images are collated only: whether they fit the model's channels and size is checked by neither the data
    layer nor the trainer yet (see tests/test_fuzz_regressions.py)."""
    import torch

    stream, model = trainer.stream, trainer.model
    model.eval()
    for task in stream.tasks:
        for ds in (task.train, task.eval):
            if ds is None:
                continue
            batch = stream.collate_fn([ds[i] for i in range(min(len(ds), 4))])
            if stream.modality == "text":
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})


def run_api_case(case: dict, assets: dict, case_dir: Path) -> tuple[str, str]:
    from pm_hf.config.groups import DataArguments, PMConfig
    from pm_hf.continual import ContinualTrainer
    from pm_hf.errors import InputError

    image = case["image"]
    model = tiny_vit_folder(assets["folder"]) if image else assets["model"]
    try:
        args = PMConfig(output_dir=str(case_dir / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                        num_train_epochs=1, per_device_train_batch_size=4)  # fmt: skip
        tasks = [_task(entry) for entry in case["tasks"]]
        data_args = DataArguments(max_length=16)
        trainer = ContinualTrainer(model=model, args=args, tasks=tasks, data_args=data_args)
        trainer.stream  # noqa: B018 - builds and validates every task
    except InputError as err:
        return "refused", str(err)[:200]
    except Exception as err:  # noqa: BLE001 - anything else escaping is what the case reports
        return "other", f"raised {type(err).__name__}: {str(err)[:300]}"
    try:
        _batches_run(trainer)
    except Exception as err:  # noqa: BLE001
        return "other", f"validated, then a batch failed: {type(err).__name__}: {str(err)[:300]}"
    return "validated", ""
