"""Build `data/fashion_digits28`: 20 classes of 28x28 grayscale images for the 10-task vision suite
(`vision-cil-10`): the 10 digits of `data/digits28` (labels 0..9, unchanged) and the 10 Fashion-MNIST classes
(labels 10..19), 144 train / 36 test images per Fashion class (about the digits' 143 / 36), drawn with a seeded
permutation from Fashion-MNIST's own train and test splits.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`, MIT
licence, Zalando Research), whose IDX files live in /usr/share/datasets/fashion-mnist. The ViT of the vision suites
was pretrained on Animal-MNIST, so none of these classes was seen in pretraining.

Columns as `data/digits28`: `image` (PNG bytes), `label` (`ClassLabel`, 20 names), `index` (the row in the source
split: digits28's `index`, or Fashion-MNIST's row). Rerunning with the same seed gives byte-identical files.

    python scripts/build_fashion_digits28.py [--fashion_dir /usr/share/datasets/fashion-mnist] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PER_CLASS = {"train": 144, "test": 36}
FILES = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped): uint8 images [N, 28, 28] or labels [N]."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def fashion_rows(fashion_dir: Path, split: str, seed: int) -> dict[str, list]:
    images = read_idx(fashion_dir / f"{FILES[split]}-images-idx3-ubyte.gz")
    labels = read_idx(fashion_dir / f"{FILES[split]}-labels-idx1-ubyte.gz").astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    rows = np.sort(np.concatenate([order[labels[order] == c][: PER_CLASS[split]] for c in range(10)]))
    return {"image": [{"bytes": png_bytes(images[i]), "path": None} for i in rows],
            "label": (labels[rows] + 10).tolist(), "index": rows.tolist()}  # fmt: skip


def build(fashion_dir: Path, output_dir: Path, seed: int = 0) -> None:
    import datasets

    names = [str(d) for d in range(10)] + list(FASHION)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names), "index": datasets.Value("int32")}
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        digits = datasets.load_dataset("parquet", data_files=str(ROOT / "data" / "digits28" / f"{split}.parquet"))
        digits = digits["train"].cast_column("image", datasets.Image(decode=False))
        table = {"image": list(digits["image"]), "label": list(digits["label"]), "index": list(digits["index"])}
        fashion = fashion_rows(fashion_dir, split, seed)
        table = {k: table[k] + fashion[k] for k in table}
        path = output_dir / f"{split}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp))
        tmp.replace(path)
        print(f"{path}: {len(table['label'])} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion_dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--output_dir", type=Path, default=ROOT / "data" / "fashion_digits28")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.fashion_dir, args.output_dir, args.seed)


if __name__ == "__main__":
    main()
