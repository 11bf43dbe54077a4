"""The inputs of the doors table (`doors.py`), made in each case's folder when its command names them, and what the
cases share, built once on first use: the tiny assets, a finished 2-task run, plain PEFT adapters (two alike, and one
differing from them each way a merge must refuse)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import yaml

from .common import base_config, make_assets

TWO_TASKS = [[0, 1], [2, 3]]


def _train_run(assets: dict, out: Path) -> str:
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, out, class_groups=TWO_TASKS)))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_continual(*parse_config(str(config)))
    return str(out)


def _adapter(model: str, folder: Path, seed: int, num_labels: int | None = None, **lora) -> str:
    """A SEQ_CLS LoRA adapter as plain PEFT saves it (its head in `modules_to_save`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    extra = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    with contextlib.redirect_stderr(io.StringIO()):
        base = AutoModelForSequenceClassification.from_pretrained(model, **extra)
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"], **lora}
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **config)).save_pretrained(folder)
    return str(folder)


def _adapters(model: str, folder: Path) -> dict:
    """Two adapters alike (a, b) and one differing each way from them."""
    other = shutil.copytree(model, folder / "other_base")
    return {"a": _adapter(model, folder / "a", 0), "b": _adapter(model, folder / "b", 1),
            "wide": _adapter(model, folder / "wide", 2, num_labels=4),
            "query_only": _adapter(model, folder / "query_only", 3, target_modules=["query"]),
            "r4": _adapter(model, folder / "r4", 4, r=4),
            "other_base": _adapter(str(other), folder / "other_base_adapter", 5)}  # fmt: skip


class Context:
    """The assets, and what the cases share, built on first use: a finished 2-task run, plain PEFT adapters."""

    def __init__(self, work: Path):
        self.work = work
        self.assets = make_assets(work / "assets")
        self._run = self._adapters = None

    @property
    def run(self) -> str:
        if self._run is None:
            self._run = _train_run(self.assets, self.work / "shared" / "run")
        return self._run

    @property
    def adapters(self) -> dict:
        if self._adapters is None:
            self._adapters = _adapters(self.assets["model"], self.work / "shared" / "adapters")
        return self._adapters

    def config(self, folder: Path, **fields) -> str:
        """A data config of the assets (its output_dir inside `folder`, not created); its path."""
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(base_config(self.assets, folder / "out", **fields)))
        return str(path)


def _write(path: Path, data: bytes = b"a file, not a folder\n") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


class Inputs(dict):
    """The inputs a command's arguments name, made in the case's folder when first named: `{f}` the folder, `{run}`
    the shared run, `{a}`, `{b}`, `{wide}`, ... the shared adapters, `{config:field=YAML;...}` a data config."""

    def __init__(self, ctx: Context, folder: Path):
        super().__init__(f=str(folder))
        self.ctx, self.folder = ctx, folder

    def __missing__(self, name: str):
        f, ctx = self.folder, self.ctx
        makers = {
            "run": lambda: ctx.run,
            "file": lambda: _write(f / "thing"),
            "empty": lambda: (f / "empty").mkdir() or str(f / "empty"),
            "photos": lambda: _write(f / "photos" / "cat.jpg", b"\xff\xd8 not a run") and str(f / "photos"),
            "killed": lambda: _killed(f / "killed"),  # a run killed during its first task: no checkpoint
            "broken": lambda: _write(f / "broken" / "latest.json", b"{not json") and str(f / "broken"),
            "exp": lambda: _write(f / "exp" / "adapter_config.json", b"{}") and str(f / "exp"),  # no pm_hf export
            "bad_weights": lambda: _broken_copy(ctx.adapters["b"], f / "bw"),  # unreadable adapter weights
            "b_copy": lambda: str(shutil.copytree(ctx.adapters["b"], f / "b")),
            "config": lambda: _Config(ctx, f),
            "untrained_test": lambda: _untrained_test(ctx, f),
            "missing_data": lambda: ctx.config(f, data_files={"train": str(f / "no.parquet")}),
        }
        self[name] = makers[name]() if name in makers else ctx.adapters[name]
        return self[name]


class _Config:
    """`{config}`: the assets' data config; `{config:class_groups=[[0, 1], [2, 3]];...}` with fields set."""

    def __init__(self, ctx: Context, folder: Path):
        self.ctx, self.folder = ctx, folder

    def __format__(self, spec: str) -> str:
        fields = dict(item.split("=", 1) for item in spec.split(";") if item)
        return self.ctx.config(self.folder, **{k: yaml.safe_load(v) for k, v in fields.items()})


def _broken_copy(adapter: str, folder: Path) -> str:
    shutil.copytree(adapter, folder)
    return _write(folder / "adapter_model.safetensors", b"not safetensors") and str(folder)


def _killed(run: Path) -> str:
    _write(run / ".pm_hf.lock", b"")
    return _write(run / "tasks" / "task_0" / "trainer_state.json", b"{}") and str(run)


def _untrained_test(ctx: Context, folder: Path) -> str:
    """A config whose test split holds class 5, which its training split lacks."""
    import pandas as pd

    train = pd.read_parquet(ctx.assets["files"]["train"])
    train[train.label != 5].to_parquet(folder / "train.parquet")
    files = {"train": str(folder / "train.parquet"), "test": ctx.assets["files"]["test"]}
    return ctx.config(folder, data_files=files, class_groups=[[0, 1], [2, 3, 4]])
