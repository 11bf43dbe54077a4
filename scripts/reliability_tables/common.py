"""What every reliability table shares: the tiny assets (a tiny BERT and a 6-class slice of the WordNet data), a base
config for them, and the contract's check of an error line and of a folder left untouched."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
WORDNET = ROOT / "data" / "wordnet_supersense10"
ERROR_LINE = re.compile(r"^pm-hf: error: (\S+) = (.+?): (.+)$")


def make_assets(folder: Path) -> dict:
    """A tiny BERT with its tokenizer and a 6-class slice of the WordNet data (train/test parquet), once."""
    from pm_hf.testing import tiny_bert_folder

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "test"):
        frame = pd.read_parquet(WORDNET / f"{split}.parquet")
        frame = frame[frame.label < 6].groupby("label").head(8 if split == "train" else 4)
        files[split] = str(folder / f"{split}.parquet")
        frame.to_parquet(files[split])
    model = tiny_bert_folder(folder / "model", pd.read_parquet(files["train"]).text.tolist())
    return {"model": model, "files": files, "folder": str(folder)}


def base_config(assets: dict, out: Path, **overrides) -> dict:
    config = {
        "model_name_or_path": assets["model"],
        "data_files": dict(assets["files"]),
        "class_groups": [[0, 1], [2, 3], [4, 5]],
        "max_length": 16,
        "r": 2,
        "lora_alpha": 4,
        "modules_to_save": ["pooler"],
        "fisher_max_samples": 8,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.02,
        "seed": 3,
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
        "output_dir": str(out),
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not _DROP}


_DROP = object()


def contract_error(code, stderr: str, expect: str) -> tuple[bool, str]:
    """(True, the line) when a command was refused by the contract: exit 2, no traceback, one line
    `pm-hf: error: <expect> = <value>: <fix>`; else (False, what happened instead)."""
    lines = [line for line in stderr.splitlines() if line.startswith("pm-hf: error:")]
    match = ERROR_LINE.match(lines[0]) if len(lines) == 1 else None
    if code != 2 or match is None or "Traceback" in stderr:
        return False, f"exit {code}: {stderr.strip()[-300:]}"
    if match.group(1) != expect:
        return False, f"names {match.group(1)!r}, not {expect!r}: {lines[0]}"
    return True, lines[0]


def _tree(folder: Path) -> dict:
    """Every path under `folder`: a file's bytes, None for a folder (a created empty folder counts too)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`pm-hf <argv>` in this process: (exit code, stderr)."""
    from pm_hf.commands.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, err.getvalue()


@contextlib.contextmanager
def hub_client(fake) -> Iterator:
    """pm_hf's Hub client replaced by a stand-in's (`fake.api`, no stored token) while inside; `fake` is yielded."""
    import pm_hf.hub.repository as repository

    saved = repository.HfApi, repository.get_token
    repository.HfApi, repository.get_token = fake.api, lambda: None
    try:
        yield fake
    finally:
        repository.HfApi, repository.get_token = saved
