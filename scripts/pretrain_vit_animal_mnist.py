"""Pretrain a small ViT on Animal-MNIST: the backbone of the `vision-cil` accuracy suite (docs/results.md).

No pretrained ViT loads offline here, so the project trains its own: a 4-layer `ViTForImageClassification` (28x28
grayscale, patch 7, hidden 96, ~0.3M parameters, ~1.2 MB) trained from scratch with a plain torch loop on the 10,000
images of Animal-MNIST (``pip install --no-deps animal-mnist==0.4``, MIT). The data are two gzipped pickles of numpy
arrays (uint8 images [N, 28, 28], int64 labels [N]) inside the package folder; the package is located with
``importlib.util.find_spec`` only: ``import animal_mnist`` needs tensorflow.

A seeded, stratified 20% of every class is held out as the test split; its accuracy is printed and recorded.
The default 22 epochs take ~100 s on 2 idle CPU cores and reach ~91% test accuracy.

The saved folder (``save_pretrained`` + a matching ``ViTImageProcessor``: grayscale 28x28, no resize, rescale 1/255,
normalise with mean 0.5 / std 0.5) holds the backbone only: the Animal-MNIST classifier is left out, so
``pm_hf.method.models.load_model`` (``from_pretrained(..., num_labels=N)``) always starts a NEW, freshly initialised
head,
even when N is 10 like Animal-MNIST's (``ignore_mismatched_sizes`` alone would keep a same-shaped animal head).

Atomic and idempotent: the folder is written under a temporary name, the marker ``pretrain_info.json`` (test
accuracy, steps, seconds) is written last, and the temp folder is renamed into place; an existing folder with the
marker is left alone unless ``--force``. Default output: ``${PM_HF_CACHE:-~/.cache/pm_hf}/vit-animal-mnist``.

Usage::

    python scripts/pretrain_vit_animal_mnist.py [--output_dir DIR] [--epochs N | --max_steps N] [--seed S] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pm_hf.fileio import replace_dir

PACKAGE = "animal_mnist"
DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
MODEL_DIRNAME = "vit-animal-mnist"
MARKER = "pretrain_info.json"
HEAD_PREFIX = "classifier."
# Normalisation shared by the training loop and the saved image processor: x / 255, then (x - 0.5) / 0.5.
MEAN, STD = 0.5, 0.5
MODEL_CONFIG = {
    "image_size": 28,
    "num_channels": 1,
    "patch_size": 7,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 192,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def default_output_dir() -> Path:
    return Path(os.environ.get("PM_HF_CACHE") or Path.home() / ".cache" / "pm_hf") / MODEL_DIRNAME


def find_data_dir() -> Path:
    """The folder holding the two pickles inside the installed `animal_mnist` package (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"The '{PACKAGE}' package is not installed: run `pip install --no-deps animal-mnist==0.4`.")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "Animal_MNIST"
        if (path / DATA_FILE).is_file() and (path / LABEL_FILE).is_file():
            return path
    raise SystemExit(f"{DATA_FILE} not found in {list(spec.submodule_search_locations)}; reinstall '{PACKAGE}'.")


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] (the package's own pickles, so trusted like its code)."""
    folder = find_data_dir()
    with gzip.open(folder / DATA_FILE, "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(folder / LABEL_FILE, "rb") as f:
        labels = np.asarray(pickle.load(f)).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise SystemExit(
            f"Unexpected Animal-MNIST format: images {images.shape} {images.dtype}, labels {labels.shape}."
        )
    return images, labels


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test row indices: `test_fraction` of every class (rounded) goes to test, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(rows)))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def subsample(rows: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` rows, the same number from every class (for quick runs and tests)."""
    if limit is None or limit >= len(rows):
        return rows
    classes = np.unique(labels[rows])
    per_class = max(1, limit // len(classes))
    rng = np.random.default_rng([seed, 1])
    picked = [rng.permutation(rows[labels[rows] == c])[:per_class] for c in classes]
    return np.sort(np.concatenate(picked))


def to_pixels(images: np.ndarray):
    """uint8 [N, 28, 28] -> float32 tensor [N, 1, 28, 28], exactly as the saved image processor would produce."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) * np.float32(1 / 255))
    return ((x - MEAN) / STD).unsqueeze(1)


def build_processor():
    try:  # the PIL backend directly: importing ViTImageProcessor without torchvision warns and falls back to it
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import ViTImageProcessor
    return ViTImageProcessor(
        do_resize=False,
        size={"height": 28, "width": 28},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[MEAN],
        image_std=[STD],
        do_convert_rgb=False,
    )


def evaluate(model, pixels, labels, batch_size: int = 500) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            logits = model(pixel_values=pixels[i : i + batch_size]).logits
            correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    model.train()
    return correct / max(1, len(labels))


def is_finished(output_dir: Path) -> bool:
    return (output_dir / MARKER).is_file()


def pretrain(
    output_dir: Path,
    epochs: float = 22,
    max_steps: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
    threads: int | None = 2,
    force: bool = False,
) -> Path:
    """Train and save the backbone to `output_dir` (no-op if already there and not `force`); returns it."""
    output_dir = Path(output_dir).expanduser().resolve()
    if is_finished(output_dir) and not force:
        print(f"{output_dir} already holds the pretrained model (delete it or pass --force to redo).")
        return output_dir
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise SystemExit(f"{output_dir} exists, is not empty and has no {MARKER}: not ours; pass --force to replace.")

    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_and_save(
            output_dir, epochs, max_steps, seed, batch_size, learning_rate, max_train_samples, max_test_samples
        )
    finally:
        torch.set_num_threads(previous)  # callers in the same process (tests) keep their setting


def _train_and_save(
    output_dir: Path,
    epochs: float,
    max_steps: int | None,
    seed: int,
    batch_size: int,
    learning_rate: float,
    max_train_samples: int | None,
    max_test_samples: int | None,
) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    start = time.perf_counter()
    images, labels = load_animal_mnist()
    train_rows, test_rows = stratified_split(labels, 0.2, seed)
    train_rows = subsample(train_rows, labels, max_train_samples, seed)
    test_rows = subsample(test_rows, labels, max_test_samples, seed)
    x_train, y_train = to_pixels(images[train_rows]), torch.from_numpy(labels[train_rows])
    x_test, y_test = to_pixels(images[test_rows]), torch.from_numpy(labels[test_rows])
    num_labels = int(labels.max()) + 1

    torch.manual_seed(seed)
    names = {i: f"animal_{i}" for i in range(num_labels)}
    config = ViTConfig(**MODEL_CONFIG, num_labels=num_labels, id2label=names, label2id={v: k for k, v in names.items()})
    model = ViTForImageClassification(config)
    model.train()
    steps_per_epoch = math.ceil(len(y_train) / batch_size)
    total = max_steps if max_steps is not None else max(1, round(epochs * steps_per_epoch))
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))),
    )
    generator = torch.Generator().manual_seed(seed)
    step, order = 0, torch.empty(0, dtype=torch.long)
    print(f"Training {model.num_parameters():,} parameters on {len(y_train)} images for {total} steps ...")
    while step < total:
        if len(order) < batch_size:  # a new epoch (the last partial batch of an epoch is dropped)
            order = torch.randperm(len(y_train), generator=generator)
        idx, order = order[:batch_size], order[batch_size:]
        x = x_train[idx]
        shift = torch.randint(-2, 3, (2,), generator=generator).tolist()  # light augmentation: a random shift
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = model(pixel_values=x, labels=y_train[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % max(1, steps_per_epoch) == 0 or step == total:
            print(f"step {step}/{total}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f} s", flush=True)
    train_seconds = time.perf_counter() - start
    accuracy = evaluate(model, x_test, y_test)
    print(f"Test accuracy: {accuracy:.4f} ({len(y_test)} held-out images)")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
        model.save_pretrained(tmp, state_dict=backbone)
        build_processor().save_pretrained(tmp)
        info = {
            "dataset": "Animal-MNIST (pip animal-mnist==0.4, MIT): 10,000 images 28x28, 10 classes",
            "split": f"stratified 80/20, seed {seed}",
            "train_samples": len(y_train),
            "test_samples": len(y_test),
            "test_accuracy": round(accuracy, 4),
            "steps": step,
            "epochs": round(step / steps_per_epoch, 2),
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "num_parameters": model.num_parameters(),
            "seconds": round(train_seconds, 1),
            "head": "not saved: from_pretrained(..., num_labels=N) starts a new classifier",
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks a complete folder
        for path in tmp.iterdir():  # mkdtemp makes the folder private; a model cache is readable like any download
            path.chmod(0o644)
        tmp.chmod(0o755)
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in output_dir.iterdir() if f.is_file())
    print(f"Saved to {output_dir} ({size / 1e6:.2f} MB, {info['seconds']} s of training).")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", type=Path, default=None, help=f"default: {default_output_dir()} (set PM_HF_CACHE to move it)"
    )
    parser.add_argument("--epochs", type=float, default=22, help="passes over the training split (default 22)")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the batches")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--max_train_samples", type=int, default=None, help="class-balanced subset (quick runs)")
    parser.add_argument("--max_test_samples", type=int, default=None, help="class-balanced subset (quick runs)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2; 0: torch's default). On a busy 2-core machine use 1: two threads competing "
        "with other processes can run 10-20x slower",
    )
    parser.add_argument("--force", action="store_true", help="train again even if the folder is already finished")
    args = parser.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max_steps must be a positive integer.")
    if args.epochs <= 0:
        parser.error("--epochs must be positive.")
    pretrain(
        args.output_dir or default_output_dir(),
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples,
        threads=args.threads or None,
        force=args.force,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
