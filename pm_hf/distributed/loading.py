"""How a model is loaded under the run's layout: in the dtype the layout loads it in (`loading_in`), whole on this
process alone (`loading_whole`: an export's pristine base), or loaded whole and then laid out (`distribute_loaded`). On
one process, under DDP and FSDP2 (which shards after loading) each is a no-op; under ZeRO-3 transformers partitions a
model as it loads, and these say how."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import private


@contextmanager
def loading_in(dtype: torch.dtype) -> Iterator[None]:
    """ZeRO-3 partitions a model as it loads, in its DeepSpeed config's dtype: fp32 unless DeepSpeed's mixed
    precision is on (pm_hf refuses it: it casts the model in place later). For a bf16 model, the load sees bf16."""
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed.deepspeed_config() if hf_deepspeed.is_deepspeed_zero3_enabled() else None
    if config is None or dtype != torch.bfloat16:
        yield
        return
    saved = config.get("bf16")
    config["bf16"] = {"enabled": True}
    try:
        yield
    finally:
        if saved is None:
            config.pop("bf16", None)
        else:
            config["bf16"] = saved


def distribute_loaded(model: nn.Module) -> nn.Module:
    """A model loaded whole (the same on every rank), laid out as the run lays out what it loads: partitioned as
    ZeRO-3 would have as it loaded, when ZeRO-3 is on, else unchanged; returns it. transformers cannot load a
    classifier with a new head partitioned (the checkpoint's head has another shape), so a classifier is loaded whole
    and partitioned here: briefly whole on every rank, as small models are."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        return model
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=hf_deepspeed.deepspeed_config())
    return model


@contextmanager
def loading_whole() -> Iterator[None]:
    """Load a model whole, on this process alone, while ZeRO-3 is on (transformers would partition it as it loads, a
    collective every rank must join): an export's pristine base, loaded by the main process only."""
    with private.hf_deepspeed_config_cleared():
        yield
