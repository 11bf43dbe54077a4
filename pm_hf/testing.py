"""Tiny models built from configs, for tests, the CI config and the reliability script: a WordPiece tokenizer over a
text sample's frequent words and a 2-layer BERT classifier saved with it. Seconds to build, nothing downloaded."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast


def tiny_tokenizer(folder: str | Path, texts: Iterable[str], max_words: int = 400) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer whose vocab is the specials, a-z/0-9 and the most frequent words of `texts`."""
    counts = Counter(w for t in texts for w in re.findall(r"[a-z0-9]+", str(t).lower()))
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    words = [w for w, _ in counts.most_common(max_words) if w not in chars]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *".,;:()'-", *words]
    path = Path(folder) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path))  # transformers 5 ignores `vocab_file=`


def tiny_bert_folder(folder: str | Path, texts: Iterable[str], num_labels: int = 2, hidden: int = 32) -> str:
    """Save a tiny BERT classifier (2 layers, no dropout, seed 0) and its tokenizer to `folder`; returns the path."""
    folder = Path(folder)
    tok = tiny_tokenizer(folder / "tokenizer", texts)
    torch.manual_seed(0)
    sizes = dict(hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=2, num_attention_heads=2)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = BertConfig(vocab_size=len(tok), num_labels=num_labels, **sizes, **no_dropout)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def fsdp_on_cpu() -> None:
    """Let Accelerate run an FSDP config on CPU processes (gloo), for tests of the FSDP2 path without a GPU.

    Accelerate sets FSDP up on accelerators only (on CPU it runs the config as DDP, and pm_hf refuses that). torch's
    FSDP2 itself runs on CPU, so this makes Accelerate take its FSDP path there too (the same sharding, the same
    Trainer code), and tells pm_hf's launch backend so (`AccelerateBackend.run_on_cpu`). Call it in each process
    before the run is built."""
    _on_cpu("fsdp")


def deepspeed_on_cpu() -> None:
    """Let Accelerate run a DeepSpeed config on CPU processes, as `fsdp_on_cpu` does for FSDP: DeepSpeed runs on CPU
    (its CPU accelerator, gloo), but Accelerate sets it up on accelerators only and on CPU would run plain DDP.
    Under `torchrun` it also starts DeepSpeed's communication (on GPUs Accelerate does), which ZeRO-3 needs from the
    moment the model is loaded (partitioned as it loads)."""
    from accelerate.utils import get_int_from_env

    _on_cpu("deepspeed")
    if get_int_from_env(["WORLD_SIZE"], 1) > 1:  # the processes `torchrun` started
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")


def _on_cpu(kind: str) -> None:
    import accelerate.state

    from .distributed import private
    from .distributed.launch import BACKEND

    BACKEND.run_on_cpu(kind)  # an explicit statement to the backend: it reads nothing this harness patches

    state_cls = accelerate.state.AcceleratorState
    flag = f"_pm_hf_{kind}_on_cpu"
    if getattr(state_cls.__init__, flag, False):
        return
    original = state_cls.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type != accelerate.state.DistributedType.MULTI_CPU:
            return
        if kind == "fsdp" and kwargs.get("fsdp_plugin") is not None:
            self.distributed_type, self.fsdp_plugin = accelerate.state.DistributedType.FSDP, kwargs["fsdp_plugin"]
        plugin = kwargs.get("deepspeed_plugin")
        if kind == "deepspeed" and plugin is not None:
            self.distributed_type = accelerate.state.DistributedType.DEEPSPEED
            plugin.set_mixed_precision("no")
            private.select_as_accelerator_state(plugin)
            self.deepspeed_plugins = plugin

    for name in dir(original):
        if name.startswith("_pm_hf_"):
            setattr(init, name, True)  # the harnesses stack
    setattr(init, flag, True)
    state_cls.__init__ = init
