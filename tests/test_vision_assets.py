"""Assets of the `vision-cil` suite: the Animal-MNIST ViT pretrain script and the digits28 builder (in-process)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    return _script("pretrain_vit_animal_mnist")


@pytest.fixture(scope="module")
def digits():
    return _script("build_digits28")


needs_animal_mnist = pytest.mark.skipif(
    importlib.util.find_spec("animal_mnist") is None, reason="pip install --no-deps animal-mnist==0.4"
)


@needs_animal_mnist
def test_pretrain_end_to_end_then_noop_and_loads_with_new_head(pretrain, tmp_path, capsys):
    from safetensors.torch import load_file

    from pm_hf.config.groups import ModelArguments
    from pm_hf.heads.head import find_head
    from pm_hf.method.models import load_model, load_processor

    out = tmp_path / "vit"
    args = ["--output_dir", str(out), "--max_steps", "3", "--max_train_samples", "100", "--max_test_samples", "50"]
    args += ["--threads", "1"]  # 2 threads on a busy 2-core machine can be 20x slower
    threads = torch.get_num_threads()
    assert pretrain.main(args) == 0
    assert torch.get_num_threads() == threads  # restored for the rest of the test process
    assert "Test accuracy:" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]  # no temp folder left behind
    files = {p.name: p for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", pretrain.MARKER} <= set(files)
    marker_time = files[pretrain.MARKER].stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= marker_time for p in files.values())  # the marker is written last
    info = json.loads(files[pretrain.MARKER].read_text())
    assert info["steps"] == 3 and info["test_samples"] == 50 and info["train_samples"] == 100
    assert 0.0 <= info["test_accuracy"] <= 1.0

    # Rerun: a no-op (nothing rewritten, nothing trained).
    before = {name: p.stat().st_mtime_ns for name, p in files.items()}
    assert pretrain.main(args) == 0
    assert "already holds the pretrained model" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # The checkpoint has no head, so load_model starts a new one even with 10 classes like Animal-MNIST.
    saved = load_file(str(files["model.safetensors"]))
    assert saved and not any(k.startswith("classifier.") for k in saved)
    model_args = ModelArguments(model_name_or_path=str(out), model_task="image_classification")
    names = [str(d) for d in range(10)]
    model = load_model(model_args, "image", 10, names)
    head_name, head = find_head(model, 10)
    assert head_name == "classifier" and head.in_features == pretrain.MODEL_CONFIG["hidden_size"]
    assert torch.count_nonzero(head.bias) == 0  # freshly initialised (bias 0), not loaded
    assert model.config.id2label == dict(enumerate(names))
    assert torch.equal(model.vit.embeddings.cls_token, saved["vit.embeddings.cls_token"])  # the backbone is loaded
    assert torch.equal(model.vit.embeddings.position_embeddings, saved["vit.embeddings.position_embeddings"])
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)

    # The saved processor gives exactly the training loop's normalisation on grayscale 28x28 images.
    from PIL import Image

    processor = load_processor(model_args)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    pixels = processor(images=[Image.fromarray(x) for x in images], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 1, 28, 28)
    torch.testing.assert_close(pixels, pretrain.to_pixels(images))


def test_pretrain_refuses_a_foreign_folder(pretrain, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(SystemExit, match="not ours"):
        pretrain.pretrain(tmp_path, max_steps=1)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_stratified_split_is_seeded_and_per_class(pretrain):
    labels = np.repeat(np.arange(4), 10)
    train, test = pretrain.stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[test]).tolist() == [2, 2, 2, 2]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(40))
    again = pretrain.stratified_split(labels, 0.2, seed=0)
    other = pretrain.stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(test, again[1]) and not np.array_equal(test, other[1])


def test_build_digits28(digits, tmp_path):
    import datasets
    from sklearn.datasets import load_digits

    paths = digits.build(tmp_path / "digits28", seed=0)
    assert sum(p.stat().st_size for p in paths.values()) < 1_000_000
    ds = datasets.load_dataset("parquet", data_files={k: str(v) for k, v in paths.items()})
    assert isinstance(ds["train"].features["image"], datasets.Image)
    source = load_digits()
    counts = np.bincount(source.target, minlength=10)
    index = {}
    for split in ("train", "test"):
        labels = np.asarray(ds[split]["label"])
        index[split] = np.asarray(ds[split]["index"])
        assert labels.dtype.kind == "i" and sorted(set(labels.tolist())) == list(range(10))
        np.testing.assert_array_equal(labels, source.target[index[split]])
        images = [ds[split][i]["image"] for i in (0, len(labels) - 1)]
        for image in images:
            array = np.asarray(image)
            assert image.mode == "L" and array.shape == (28, 28) and array.dtype == np.uint8
        # The pixels are the bilinear upsampling of the source 8x8 image.
        np.testing.assert_array_equal(np.asarray(images[0]), digits.upsample(source.images[index[split][:1]])[0])
    test_counts = np.bincount(np.asarray(ds["test"]["label"]), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)  # stratified 80/20
    assert len(np.intersect1d(index["train"], index["test"])) == 0
    assert len(index["train"]) + len(index["test"]) == len(source.target)

    # Deterministic: a rebuild is byte-identical, and the committed files hold the same data.
    again = digits.build(tmp_path / "again", seed=0)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
    committed = ROOT / "data" / "digits28"
    if (committed / "test.parquet").is_file():
        old = datasets.load_dataset("parquet", data_files=str(committed / "test.parquet"))["train"]
        assert np.asarray(old["index"]).tolist() == index["test"].tolist()
        assert np.array_equal(np.asarray(old[5]["image"]), np.asarray(ds["test"][5]["image"]))
