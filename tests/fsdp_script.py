"""Run under `torchrun --nproc_per_node 2` by the tests (or alone, for the 1-process reference): a 2-task continual
instruction run of the tiny Llama on CPU processes (gloo), sharded by FSDP2 with `sharded` (see
`pm_hf.testing.fsdp_on_cpu`), stopped after task 1 and resumed with `resume`. Each process writes to
OUT/rank<r>.json its alphas, delta norms, score matrices, the run's `distributed` record and the fraction of the
continual state (S, G) its own shards hold; the checkpoint and the export are in OUT/run as usual.

    python tests/fsdp_script.py LLM_DIR OUT PER_DEVICE_BATCH [sharded] [resume] [launcher]

With `launcher` the FSDP setup comes from `accelerate launch --config_file configs/accelerate/fsdp.yaml` (its
environment) instead of the training arguments.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import llm_groups  # noqa: E402  (sets the offline switches first)

from pm_hf.continual import ContinualTrainer  # noqa: E402
from pm_hf.sharding import local  # noqa: E402
from pm_hf.testing import fsdp_on_cpu  # noqa: E402

FSDP = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


def main(model_dir: str, out: str, batch: int, sharded: bool, resume: bool, launcher: bool) -> None:
    if sharded or launcher:
        fsdp_on_cpu()
    extra = FSDP if sharded and not launcher else {}
    args = llm_groups(model_dir, Path(out) / "run", per_device_train_batch_size=batch, logging_steps=1,
                      save_strategy="no", **extra)  # fmt: skip
    if resume:
        ContinualTrainer.from_args(*args).train(stop_after=1)
    trainer = ContinualTrainer.from_args(*args)
    results = trainer.train(resume_from_checkpoint=resume)
    state = [*trainer.loop.strategy.S.values(), *trainer.loop.strategy.G.values()]
    held = sum(local(t).numel() for t in state) / sum(t.numel() for t in state)
    record = {"alphas": results["alphas"], "delta_norms": results["delta_norms"], "state_fraction": held,
              "scores": results["score_matrices"], "distributed": results.get("distributed")}  # fmt: skip
    (Path(out) / f"rank{args[2].process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    flags = sys.argv[4:]
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), "sharded" in flags, "resume" in flags, "launcher" in flags)
