"""Build `data/digits28`: scikit-learn's bundled digits (8x8, values 0..16) upsampled to 28x28 grayscale PNGs.

The images of the `vision-cil` accuracy suite (docs/results.md): the same size and layout as the
Animal-MNIST images the suite's ViT was pretrained on (scripts/pretrain_vit_animal_mnist.py), so no resize is needed.

Each 8x8 image is scaled to 0..255 (x * 255 / 16), upsampled with bilinear interpolation
(`torch.nn.functional.interpolate`, align_corners=False), rounded to uint8 and PNG-encoded. A seeded, stratified
80/20 split (`sklearn.model_selection.train_test_split`, `random_state=seed`) gives `train.parquet` (1,437 rows) and
`test.parquet` (360 rows) with columns `image` (datasets `Image` feature, PNG bytes) and `label` (`ClassLabel`,
int ids 0..9, names "0".."9"), plus `index` (the row in `sklearn.datasets.load_digits()`). Rows keep `load_digits`
order. Rerunning with the same seed and library versions gives byte-identical files.

Load with ``datasets.load_dataset("parquet", data_files={"train": ".../train.parquet", "test": ".../test.parquet"})``.

Usage::

    python scripts/build_digits28.py [--output_dir data/digits28] [--seed 0] [--test_size 0.2]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

SIZE = 28
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "data" / "digits28"


def upsample(images: np.ndarray, size: int = SIZE) -> np.ndarray:
    """float [N, 8, 8] in 0..16 -> uint8 [N, size, size] in 0..255 (bilinear)."""
    import torch

    x = torch.from_numpy(np.asarray(images, dtype=np.float32) * np.float32(255 / 16))[:, None]
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def build(output_dir: Path = DEFAULT_OUTPUT, seed: int = 0, test_size: float = 0.2) -> dict[str, Path]:
    """Write train.parquet and test.parquet under `output_dir`; returns their paths."""
    import datasets
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    images = upsample(digits.images)
    rows = np.arange(len(labels))
    train_rows, test_rows = train_test_split(rows, test_size=test_size, random_state=seed, stratify=labels)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "index": datasets.Value("int32"),
        }
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in (("train", train_rows), ("test", test_rows)):
        split_rows = np.sort(split_rows)
        table = {
            "image": [{"bytes": png_bytes(images[i]), "path": None} for i in split_rows],
            "label": labels[split_rows].tolist(),
            "index": split_rows.tolist(),
        }
        path = output_dir / f"{split}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp))
        tmp.replace(path)
        paths[split] = path
        print(f"{path}: {len(split_rows)} rows, {path.stat().st_size / 1e3:.0f} kB")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    parser.add_argument("--test_size", type=float, default=0.2, help="test fraction of every class (default 0.2)")
    args = parser.parse_args(argv)
    if not 0 < args.test_size < 1:
        parser.error("--test_size must lie in (0, 1).")
    build(args.output_dir, seed=args.seed, test_size=args.test_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
