"""Model loading per task family: the tokenizer or image processor, a classifier with one head row per class of the
whole stream, or a causal LM. The class head itself (mask, merge policy) is `pm_hf.heads.head`, its alignment
`pm_hf.heads.alignment`."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers import logging as hf_logging

from ..config.checks import InputError, invalid
from ..config.groups import ModelArguments
from ..distributed.loading import distribute_loaded, loading_in, loading_whole
from ..fileio import file_digest

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_loading():
    """Model loading and saving without transformers' progress bars and load report (a new head is expected: the
    run shows one bar over tasks)."""
    enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if enabled:
            hf_logging.enable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A local folder for `name` when one exists (the folder itself, `~` expanded), else `name` (a Hub id, loaded
    from the Hub or the Hugging Face cache). A path-like name (starting with '/', '.' or '~') that is not a folder
    is an error naming the scripts that build the offline models."""
    expanded = os.path.expanduser(name)
    if Path(expanded).is_dir():
        return expanded
    if name.startswith(("/", ".", "~")):
        raise invalid(
            "model_name_or_path",
            name,
            "not a folder. For the offline recipes build it once first: "
            "`python scripts/convert_smollm2.py` (SmolLM2-135M-Instruct) or "
            "`python scripts/pretrain_vit_animal_mnist.py`"
            " (the vision-cil ViT); otherwise give a Hub model id.",
        )
    return name


def hub_kwargs(model_args: ModelArguments, weights: bool = False) -> dict:
    """`from_pretrained` options of the config: revision, trust_remote_code and (for the weights) the attention
    kernel and the quantization (bitsandbytes, which needs a CUDA GPU: refused otherwise)."""
    out = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    if weights and model_args.attn_implementation is not None:
        out["attn_implementation"] = model_args.attn_implementation
    if weights and (model_args.load_in_4bit or model_args.load_in_8bit):
        out["quantization_config"] = quantization_config(model_args)
    return {k: v for k, v in out.items() if v is not None}


def quantization_config(model_args: ModelArguments):
    """bitsandbytes' 4-bit NF4 (bf16 compute) or 8-bit config; an input error where it cannot run."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    field = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise invalid(field, True, "needs a CUDA GPU and `pip install bitsandbytes`; the merged-adapter path itself "
                      "runs anywhere with `merge_into: adapter`.")  # fmt: skip
    if model_args.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_config(model_args: ModelArguments):
    """The model's `AutoConfig`; a missing folder or a model that cannot be loaded is an error naming the field."""
    name = model_args.model_name_or_path
    path = resolve_model_path(name)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise invalid("model_name_or_path", name, "the folder holds no config.json: give a saved model folder.")
    try:
        return AutoConfig.from_pretrained(path, **hub_kwargs(model_args))
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:200]
        raise invalid("model_name_or_path", name, f"not a local model folder and not loadable here: {reason}") from err


def config_of(model, model_args: ModelArguments):
    """The config of `model` given as an object, else of `model_args`' model (read, its weights not loaded); None
    when it cannot be read (the load reports why)."""
    if model is not None:
        return getattr(model, "config", None)
    try:
        return load_config(model_args)
    except InputError:
        return None


def is_causal_lm(model_args: ModelArguments) -> bool:
    """`model_task: causal_lm`, or 'auto' with a checkpoint whose architecture is a *ForCausalLM."""
    config = load_config(model_args)  # checks the model first, whatever the task
    if model_args.model_task != "auto":
        return model_args.model_task == "causal_lm"
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


@contextlib.contextmanager
def readable_weights(model_args: ModelArguments):
    """Within: loading the model's weights; a folder without them, or with a cut or damaged file, is an input error
    naming the model (before: the loader's traceback, once the data had been read)."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        fix = f"its weights cannot be read ({reason}): check that the folder holds them whole, or the Hub id."
        raise invalid("model_name_or_path", model_args.model_name_or_path, fix) from err


def load_causal_lm(model_args: ModelArguments):
    """`AutoModelForCausalLM` from a Hub id or a local folder, in `model_args.dtype` (under DeepSpeed ZeRO-3,
    partitioned as it loads, in that dtype)."""
    dtype = torch.bfloat16 if model_args.dtype == "bfloat16" else torch.float32
    path = resolve_model_path(model_args.model_name_or_path)
    with loading_in(dtype), readable_weights(model_args):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **hub_kwargs(model_args, weights=True))


def load_processor(model_args: ModelArguments):
    """The tokenizer (text) or image processor (images) of the model; None for an image model without one."""
    path = resolve_model_path(model_args.model_name_or_path)
    if model_args.model_task == "causal_lm":
        return AutoTokenizer.from_pretrained(path, **hub_kwargs(model_args))
    if model_args.model_task in ("auto", "sequence_classification"):
        try:
            return AutoTokenizer.from_pretrained(path, **hub_kwargs(model_args))
        except (OSError, ValueError, TypeError):
            if model_args.model_task == "sequence_classification":
                raise
    try:
        return AutoImageProcessor.from_pretrained(path, **hub_kwargs(model_args))
    except (OSError, ValueError, TypeError):
        return None


def load_model(model_args: ModelArguments, modality: str, num_labels: int, label_names: list[str] | None = None):
    """A classifier with `num_labels` outputs (a new head when the checkpoint's differs)."""
    path = resolve_model_path(model_args.model_name_or_path)
    auto = AutoModelForSequenceClassification if modality == "text" else AutoModelForImageClassification
    kwargs = {}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    dtype = torch.bfloat16 if model_args.dtype == "bfloat16" else torch.float32
    kwargs.update(hub_kwargs(model_args, weights=True))
    with loading_whole(), readable_weights(model_args):  # ZeRO-3: partitioned once loaded (not a new head)
        model = auto.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True, dtype=dtype, **kwargs)
    return distribute_loaded(model)


def model_digest(model_args: ModelArguments) -> str:
    """What identifies the model's files: sha256 over a local folder's files (config, weights, tokenizer), else the
    Hub id (its revision pins it)."""
    path = Path(resolve_model_path(model_args.model_name_or_path))
    if not path.is_dir():
        return f"hub:{model_args.model_name_or_path}"
    return file_digest([p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")])
