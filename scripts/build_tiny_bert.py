"""Build the tiny BERT classifier that `configs/ci_tiny.yaml` runs on (committed under data/tiny-bert, ~0.2 MB):
2 layers, hidden size 32, a WordPiece vocabulary of the 400 most frequent words of the WordNet glosses, seed 0.

    python scripts/build_tiny_bert.py [--out data/tiny-bert]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tiny-bert")
    args = parser.parse_args(argv)
    from pm_hf.fileio import atomic_dir
    from pm_hf.testing import tiny_bert_folder

    texts = pd.read_parquet(ROOT / "data" / "wordnet_supersense10" / "train.parquet")["text"].tolist()
    with atomic_dir(args.out) as tmp:
        tiny_bert_folder(tmp, texts, num_labels=2, hidden=32)
        for sub in tmp.glob("tokenizer"):  # the tokenizer is saved next to the model as well
            for f in sub.iterdir():
                f.unlink()
            sub.rmdir()
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"Saved {args.out} ({size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
