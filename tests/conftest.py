"""Shared fixtures and helpers: offline HF switches, tiny models of every supported family built from configs, a tiny
BERT saved with a tokenizer over the real WordNet data, the argument groups of a small continual run, and a
`Recorder` callback that observes the loop."""

import gc
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="pm_hf_hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from pm_hf.method.callbacks import ContinualCallback  # noqa: E402


def _seed_hf_cache() -> None:
    """The pip-packaged models under their Hub ids in this session's HF cache (as `make install` does for users)."""
    import importlib.util

    from huggingface_hub import constants

    spec = importlib.util.spec_from_file_location(
        "seed_hf_cache", Path(__file__).parents[1] / "scripts" / "seed_hf_cache.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.seed_packaged(Path(constants.HF_HUB_CACHE))


_seed_hf_cache()
from pm_hf.testing import tiny_bert_folder, tiny_tokenizer  # noqa: E402, F401  (tests import tiny_tokenizer)

# Under pytest-xdist (`make test` runs 2 workers on 2 cores) each worker computes on one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# Test tiers (markers registered in pyproject.toml). A test's tier follows from what it runs, so no test file has to
# carry the marker: `distributed` = it launches several processes (torchrun or spawned gloo groups); `unit` = it is in
# a module of small pure functions checked by hand (math, layout, parsing: no training run); `integration` = the rest
# (tiny models trained end to end). `slow` is set by hand on heavy runs and stays out of `make test`.
UNIT_MODULES = {
    "test_calibration", "test_doc_figures", "test_fisher", "test_layout", "test_memory", "test_merge", "test_metrics",
    "test_strategies", "test_zero3",
}  # fmt: skip
LAUNCHES = ("torchrun(", "on_two_processes(", "one_process(")
RUNS = ("run_continual(", "build_loop(", ".train(", "main([")  # a training run or a command in this process


def _tier(item) -> str:
    import inspect

    source = inspect.getsource(item.function) if hasattr(item, "function") else ""
    if any(launch in source for launch in LAUNCHES):
        return "distributed"
    trains = any(run in source for run in RUNS) or {"model_dir", "llm_dir"} & set(item.fixturenames)
    return "unit" if item.module.__name__ in UNIT_MODULES and not trains else "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(_tier(item))


def tiny_bert(num_labels: int = 4, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def tiny_vit(num_labels: int = 4, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=24,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def randomize_lora(model, seed: int = 1, scale: float = 0.3) -> None:
    """Give every LoRA factor non-trivial values (B != 0), so a merge test cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def bert_factory():
    return tiny_bert


@pytest.fixture
def llama_factory():
    return tiny_llama


# ------------------------------------------------------------------------------------------ continual runs
DATA = Path(__file__).resolve().parents[1] / "data" / "wordnet_supersense10"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny BERT (2 labels) with a WordPiece tokenizer over the WordNet glosses, saved to a folder."""
    import pandas as pd

    tmp = tmp_path_factory.mktemp("tiny_bert")
    return tiny_bert_folder(tmp / "model", pd.read_parquet(DATA / "train.parquet")["text"].tolist()[:2000])


def _training(out, **kw) -> dict:
    """PMConfig fields of a quick test run: one epoch on CPU, no trackers, no bars; `kw` adds or overrides."""
    return {"output_dir": str(out), "num_train_epochs": 1, "report_to": [], "use_cpu": True, "disable_tqdm": True, **kw}


ZERO2 = {  # DeepSpeed ZeRO-2 as `TrainingArguments.deepspeed`: batch sizes and clipping from the Trainer's arguments
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}


ZERO3 = {
    **ZERO2,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}  # every weight partitioned


def two_domains(folder) -> list[dict]:
    """Two domains of the same 4 classes (alternate rows of each class), as `task_datasets` entries with their
    parquet files written under `folder`."""
    import pandas as pd

    frame, test = (pd.read_parquet(DATA / f"{split}.parquet") for split in ("train", "test"))
    domains = []
    for d in range(2):
        path = Path(folder) / f"domain{d}"
        path.mkdir(parents=True)
        pick = lambda f, d=d: pd.concat([f[f.label == c].iloc[d::2].head(16) for c in range(4)])  # noqa: E731
        pick(frame).to_parquet(path / "train.parquet")
        pick(test).to_parquet(path / "test.parquet")
        domains.append({"data_files": {s: str(path / f"{s}.parquet") for s in ("train", "test")}})
    return domains


def groups(model_dir, out, **kw):
    """The six argument groups of a 3-task class-incremental run on the tiny BERT; `kw` overrides any field."""
    from pm_hf.config.groups import (
        DataArguments,
        FisherArguments,
        LoraArguments,
        MergeArguments,
        ModelArguments,
        PMConfig,
    )

    data = dict(
        dataset_name="parquet",
        data_files={"train": str(DATA / "train.parquet"), "test": str(DATA / "test.parquet")},
        class_groups=[[0, 1], [2, 3], [4, 5]],
        max_train_samples_per_class=16,
        max_eval_samples_per_class=8,
        max_length=24,
    )
    train = _training(out, per_device_train_batch_size=8, learning_rate=2e-2, logging_steps=2, seed=3)
    merge = {}
    for key in list(kw):
        if key in MergeArguments.__dataclass_fields__:
            merge[key] = kw.pop(key)
        elif key in DataArguments.__dataclass_fields__:
            data[key] = kw.pop(key)
    train.update(kw)
    return (
        ModelArguments(model_name_or_path=model_dir),
        DataArguments(**data),
        PMConfig(**train),
        LoraArguments(r=4, modules_to_save=["pooler"]),
        FisherArguments(fisher_max_samples=24),
        MergeArguments(**merge),
    )


def checkpoint_tensors(out) -> dict:
    """The tensors of the latest checkpoint under `out` (`weights/`, `strategy/`, `callbacks/<key>/`)."""
    import json

    from safetensors.torch import load_file

    latest = json.loads((Path(out) / "latest.json").read_text())["checkpoint"]
    return load_file(str(Path(out) / latest / "state.safetensors"))


class Recorder(ContinualCallback):
    """Observes the loop: the model, each task's log entry and copies of the parameters matching `keep`."""

    def __init__(self, keep: str = "classifier"):
        self.keep, self.model, self.logs, self.params = keep, None, [], []

    def on_task_end(self, t, model, log):
        from pm_hf.method.adapters import full_trainable_params

        self.model = model
        self.logs.append(log)
        params = full_trainable_params(model)
        self.params.append({k: v.detach().clone() for k, v in params.items() if k.startswith(self.keep)})


def end_processes() -> None:
    """The end of a script run by `torchrun`: every process waits for the others and takes the process group down
    (the CLI's `_end_processes`), so no communication thread is left running when the interpreter exits."""
    from pm_hf.commands.cli import _end_processes

    _end_processes()


def _gloo_rank(rank: int, port: int, worker) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        worker(rank)
        torch.distributed.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        torch.distributed.destroy_process_group()
        gc.collect()  # FSDP2's modules freed now: left to the interpreter's exit, a thread aborted it (SIGABRT)


def on_two_processes(worker) -> None:
    """Run `worker(rank)` (a module-level function) on 2 spawned CPU processes that share a gloo process group."""
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_rank, args=(port, worker), nprocs=2, join=True)


def torchrun(model_dir, out, batch: int, *flags, script: str = "ddp_script.py", record: str = "rank",
             timeout: int = 600) -> list[dict]:  # fmt: skip
    """Run tests/<script> (ddp_script.py, fsdp_script.py) on 2 CPU processes (gloo); returns what each rank recorded
    (OUT/<record><rank>.json)."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script, launcher = Path(__file__).parent / script, Path(sys.executable).parent / "torchrun"
    cmd = [str(launcher), "--nproc_per_node", "2", "--master_port", port, str(script), model_dir, str(out), str(batch)]
    done = subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((Path(out) / f"{record}{r}.json").read_text()) for r in (0, 1)]


INSTRUCT = Path(__file__).resolve().parents[1] / "data" / "wordnet_instruct"
TASKS = ("define", "category")


def _rows(task):
    import json

    return [json.loads(line) for line in (INSTRUCT / task / "train.jsonl").read_text().splitlines()]


def tiny_llm_folder(folder: Path) -> str:
    """A tiny random Llama with a WordPiece tokenizer over the instruction data, saved to `folder`/model."""
    texts = [r[k] for t in TASKS for r in _rows(t) for k in ("prompt", "response")]
    tok = tiny_tokenizer(folder, texts, max_words=150)
    model = tiny_llama(0)
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.sep_token_id
    model.config.bos_token_id = tok.cls_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.bos_token_id = tok.cls_token_id
    model.config.max_position_embeddings = 64
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return str(folder / "model")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return tiny_llm_folder(tmp_path_factory.mktemp("tiny_llm"))


def llm_groups(model_dir, out, merge_method="pm", **kw):
    """The six argument groups of a 2-task instruction run on the tiny Llama; `kw` overrides any field."""
    from pm_hf.config.groups import (
        DataArguments,
        FisherArguments,
        LoraArguments,
        MergeArguments,
        ModelArguments,
        PMConfig,
    )

    data = dict(
        task_datasets=[
            {"dataset_name": "json", "data_files": {s: str(INSTRUCT / t / f"{s}.jsonl") for s in ("train", "test")}}
            for t in TASKS
        ],
        max_train_samples=12,
        max_eval_samples=6,
        max_length=48,
    )
    data.update({k: kw.pop(k) for k in list(kw) if k in DataArguments.__dataclass_fields__})
    merge = {k: kw.pop(k) for k in list(kw) if k in MergeArguments.__dataclass_fields__}
    model = {k: kw.pop(k) for k in list(kw) if k in ("dtype", "max_new_tokens", "primary_metric")}
    train = _training(out, per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2, seed=1)
    train.update(kw)
    return (
        ModelArguments(model_name_or_path=model_dir, max_new_tokens=4, **model),
        DataArguments(**data),
        PMConfig(**train),
        LoraArguments(r=2, lora_alpha=4),
        FisherArguments(fisher_max_samples=8),
        MergeArguments(merge_method=merge_method, **merge),
    )
