"""Shared fixtures: offline HF switches, and tiny models of every supported family built from configs."""

import os
import tempfile

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

torch.set_num_threads(2)


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


def tiny_tokenizer(tmp_dir, texts, max_words: int = 400):
    """A BERT WordPiece tokenizer whose vocab is the specials, a-z/0-9 and the most frequent words of `texts`."""
    import re
    from collections import Counter
    from pathlib import Path

    from transformers import BertTokenizerFast

    counts = Counter(w for t in texts for w in re.findall(r"[a-z0-9]+", str(t).lower()))
    chars = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    words = [w for w, _ in counts.most_common(max_words) if w not in chars]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *".,;:()'-", *words]
    path = Path(tmp_dir) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(path))  # transformers 5 ignores `vocab_file=`
