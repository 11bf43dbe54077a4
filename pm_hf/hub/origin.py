"""Where an export's base model comes from, and how an export folder names it so that the folder still loads after it
is moved or copied: a base from the Hub by its id (and revision), a base inside the export (`base/`) by a path
relative to the folder, another local base by its absolute path. Also the framework versions an export records."""

from __future__ import annotations

import contextlib
from importlib import metadata
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..version import __version__

FRAMEWORKS = ("pm_hf", "transformers", "peft", "torch", "huggingface_hub")
IN_MEMORY = "in-memory"  # model_name_or_path of a model given as an object with no folder behind it


def cached_hub_id(path: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) when `path` is a model snapshot of the Hugging Face cache (`models--ORG--NAME/snapshots/
    <commit>`), else None."""
    parts = Path(path).expanduser().resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/"), parts[i + 2]
    return None


def hub_origin(name: str | None, revision: str | None = None) -> tuple[str, str | None] | None:
    """(Hub id, revision) of a base model named `name` (`model_name_or_path`) when it came from the Hub: a name
    that is not a local path, or a snapshot folder of the HF cache; None for a local model."""
    if not name or name == IN_MEMORY:
        return None
    if Path(name).expanduser().exists():
        return cached_hub_id(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name, revision


def base_reference(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """How an adapter outside the base's folder names its base: the Hub id (and revision) when it came from the Hub,
    else the local folder's absolute path (valid wherever the adapter is moved on this machine)."""
    if not name or name == IN_MEMORY:
        return name, revision
    return hub_origin(name, revision) or (str(Path(name).expanduser().resolve()), None)


def resolve_base(folder: str | Path, base: str) -> str:
    """`base_model_name_or_path` of the adapter in `folder` as `from_pretrained` takes it: a path relative to the
    folder (an export's own `base/`) made absolute; Hub ids and absolute paths as they are."""
    if base and not Path(base).is_absolute() and (Path(folder) / base).is_dir():
        return str((Path(folder) / base).resolve())
    return base


def framework_versions() -> dict[str, str]:
    """The versions of pm_hf (this one's, as the run record names it: an editable install's metadata can lag) and of
    the installed libraries an export is written and loaded with."""
    out = {}
    for name in FRAMEWORKS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = __version__ if name == "pm_hf" else metadata.version(name)
    return out
