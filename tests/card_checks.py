"""What every export's model card must satisfy, for the tests of each kind of output: front matter that
`huggingface_hub`'s `ModelCard` parses, no local path as `base_model`, no unset (None) field, no table without rows,
no link to an image that is not in the folder, and the framework versions recorded."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

VERSIONS = ("pm_hf", "transformers", "peft", "torch")


def _tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def check_card(folder: Path) -> ModelCard:
    """The card of an export folder, loaded and checked; returns it for the caller's own checks."""
    folder = Path(folder)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    if data.get("base_model"):
        validate_repo_id(data["base_model"])  # a Hub id, never a path
        assert not Path(data["base_model"]).exists()
    assert "None" not in card.content, "an unset field is printed"
    for table in _tables(card.text):
        assert len(table) > 2 and set(table[1]) <= set("|-"), f"a table without rows: {table}"
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text):
        assert (folder / link).is_file(), f"the card links {link}, which is not in the folder"
    for name in VERSIONS:
        assert re.search(rf"^- {name} \S+$", card.text, re.M), f"{name}'s version is not recorded"
    for result in card.data.eval_results or []:
        if result.metric_name in ("BWT", "forgetting"):
            assert result.metric_type != "accuracy"
    return card
