"""Run under `torchrun --nproc_per_node 2` (or alone, for the 1-process reference): a 2-task class-incremental run of
a tiny ViT on scikit-learn's digits (real 8x8 images shipped with scikit-learn) with the 'seen' head alignment, on CPU
processes (gloo), its weights sharded by FSDP2 (`sharded`) or partitioned by DeepSpeed ZeRO-3 (`zero3`). Each process
writes OUT/rank<r>.json: its alphas, accuracy matrix and the run's `distributed` record.

    python tests/vit_script.py DATA_DIR OUT PER_DEVICE_BATCH [sharded | zero3]

DATA_DIR gets the digits' parquet files and the tiny ViT when it has none (run the 1-process reference first).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ZERO3, end_processes, groups, tiny_vit  # noqa: E402  (sets the offline switches first)

from pm_hf.config.groups import LoraArguments, ModelArguments  # noqa: E402
from pm_hf.continual import run_continual  # noqa: E402
from pm_hf.testing import deepspeed_on_cpu, fsdp_on_cpu  # noqa: E402

FSDP = {
    "fsdp": "full_shard",
    "fsdp_config": {
        "version": 2,
        "transformer_layer_cls_to_wrap": ["ViTLayer"],
        "state_dict_type": "SHARDED_STATE_DICT",
    },
}


def digits_and_vit(folder: Path) -> None:
    import pandas as pd
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None]  # [N, 1, 8, 8] in [0, 1]
    frame = pd.DataFrame({"image": [img.tolist() for img in images], "label": digits.target})
    folder.mkdir(parents=True)
    frame.iloc[::5].to_parquet(folder / "test.parquet")
    frame.drop(frame.index[::5]).to_parquet(folder / "train.parquet")
    tiny_vit(num_labels=2).save_pretrained(folder / "vit")


def main(data: Path, out: Path, batch: int, flags: list[str]) -> None:
    if not data.exists():
        digits_and_vit(data)
    extra = {}
    if "sharded" in flags:
        fsdp_on_cpu()
        extra = FSDP
    if "zero3" in flags:
        deepspeed_on_cpu()
        extra = {"deepspeed": ZERO3}
    files = {"train": str(data / "train.parquet"), "test": str(data / "test.parquet")}
    args = list(groups(str(data / "vit"), out / "run", class_groups=[[0, 1], [2, 3]], num_train_epochs=2,
                       max_train_samples_per_class=32, learning_rate=5e-2, per_device_train_batch_size=batch,
                       head_align="seen", data_files=files, **extra))  # fmt: skip
    args[0] = ModelArguments(model_name_or_path=str(data / "vit"), model_task="image_classification")
    args[3] = LoraArguments(r=2)
    results = run_continual(*args)
    record = {k: results[k] for k in ("alphas", "accuracy_matrix", "distributed")}
    (out / f"rank{args[2].process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    end_processes()
