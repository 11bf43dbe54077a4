"""Run under `torchrun --nproc_per_node 2` by the tests (or alone, for the 1-process reference): the int8 stand-in
base of tests/test_quantized.py (its merges go to a merged adapter) through a 2-task run, under DeepSpeed ZeRO-2 with
`zero2`. Each process writes OUT/rank<r>.json: its alphas, accuracy matrix, whether the int8 weights are untouched,
and the run's `distributed` record.

    python tests/quantized_script.py TOKENIZER_DIR OUT PER_DEVICE_BATCH [zero2]

(TOKENIZER_DIR: where the tiny tokenizer is written; each run builds the same stand-in model.)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from conftest import ZERO2, end_processes  # noqa: E402  (sets the offline switches first)
from test_api import WORDNET, args, task  # noqa: E402
from test_quantized import quantized_bert  # noqa: E402

from pm_hf.config.groups import DataArguments, LoraArguments  # noqa: E402
from pm_hf.continual import ContinualTrainer  # noqa: E402
from pm_hf.testing import deepspeed_on_cpu, tiny_tokenizer  # noqa: E402


def main(tok_dir: Path, out: Path, batch: int, zero2: bool) -> None:
    if zero2:
        deepspeed_on_cpu()
    tok = tiny_tokenizer(tok_dir, WORDNET["train"]["text"][:500])
    model = quantized_bert(tok)
    int8 = [p.detach().clone() for p in model.parameters() if p.dtype == torch.int8]
    extra = {"deepspeed": ZERO2} if zero2 else {}
    trainer = ContinualTrainer(model=model, args=args(out / "run", per_device_train_batch_size=batch, **extra),
                               tasks=[task(0, 1), task(2, 3)], processing_class=tok, lora_args=LoraArguments(r=2),
                               data_args=DataArguments(max_length=24))  # fmt: skip
    results = trainer.train().results
    after = [p.detach() for p in model.parameters() if p.dtype == torch.int8]
    untouched = len(int8) == len(after) == 4 and all(torch.equal(a, b) for a, b in zip(int8, after))
    record = {"alphas": results["alphas"], "accuracy_matrix": results["accuracy_matrix"], "int8_untouched": untouched,
              "distributed": results["distributed"]}  # fmt: skip
    (out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), "zero2" in sys.argv[4:])
    end_processes()
