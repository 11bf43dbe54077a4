"""Every touch of another library's private state, in one place: each is a small function here, and `ENTRIES` names
it with the library versions it was checked against (tests/test_private.py fails when an installed library no longer
has it as pm_hf uses it). PEFT layer internals are not here: they stay in `pm_hf.method.adapters`, the one module that
knows PEFT layers. A new touch of private state elsewhere in pm_hf goes here, with its entry and its test.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

CHECKED = {  # the versions every entry below was checked against (`pip show`)
    "accelerate": "1.16.0",
    "deepspeed": "0.19.8",
    "transformers": "5.25.0",
    "peft": "0.21.2",
    "torch": "2.13.0",
}


@dataclass(frozen=True)
class Entry:
    library: str
    name: str  # the private object or attribute, as the library spells it
    use: str  # what pm_hf does with it, and why


ENTRIES = (
    Entry("accelerate", "Accelerator.prepare_model: model._is_accelerate_prepared",
          "dropped before a task's Trainer: a model prepared for evaluation is otherwise not wrapped for training"),
    Entry("accelerate", "AcceleratorState._shared_state",
          "whether an AcceleratorState exists yet (reading `AcceleratorState()` would create one)"),
    Entry("accelerate", "accelerate.utils.other.is_deepspeed_available",
          "replaced in `extract_model_from_parallel`'s module: it imports deepspeed on every unwrap otherwise"),
    Entry("accelerate", "DeepSpeedPlugin.select(_from_accelerator_state=True)",
          "the test harness (`pm_hf.testing.deepspeed_on_cpu`) selects the plugin as AcceleratorState does"),
    Entry("transformers", "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref",
          "cleared while a model is loaded whole on one process under ZeRO-3 (an export's pristine base)"),
    Entry("transformers", "Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)",
          "overridden by `PerturbationMixin` (super(), then the fully trained parameters a checkpoint keeps)"),
    Entry("transformers", "HfArgumentParser._add_dataclass_arguments(dtype)",
          "overridden by `pm-hf train`'s parser (calls super(), then groups the inherited fields under their class)"),
    Entry("deepspeed", "Parameter.ds_tensor / ds_shape / ds_id / ds_status",
          "a ZeRO-3 parameter's partition, whole shape, identity and gathered state: read and written in place"),
    Entry("deepspeed", "Parameter._z3_optimizer",
          "dropped after an engine is destroyed: every ZeRO-3 parameter still references its optimizer"),
    Entry("deepspeed", "Module.pre_bwd_fn / post_bwd_fn / applied_pre_backward_ref_cnt / ds_grads_remaining",
          "dropped when the between-task hooks come off: bound to the first engine, kept otherwise"),
    Entry("deepspeed", "deepspeed.runtime.zero.parameter_offload.DeepSpeedZeRoOffload",
          "ZeRO-3's parameter hooks without an optimizer, between tasks (the Fisher, evaluation)"),
    Entry("deepspeed", "DeepSpeedEngine.module_forward_pre_hook / module_forward_post_hook",
          "removed when a task's engine is destroyed (`destroy` leaves the forward hooks on the model)"),
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ accelerate
def forget_accelerate_prepared(model: nn.Module) -> None:
    """Accelerate marks a model it prepared for evaluation (unwrapped) and then skips wrapping it for training."""
    model.__dict__.pop("_is_accelerate_prepared", None)


def accelerator_state_exists() -> bool:
    """Whether this process has an `AcceleratorState` (without creating one)."""
    from accelerate.state import AcceleratorState

    return bool(AcceleratorState._shared_state)


def _deepspeed_imported() -> bool:
    return "deepspeed" in sys.modules


def unwrap_without_importing_deepspeed() -> None:
    """Accelerate's `extract_model_from_parallel` (run by every `Trainer.__init__` and model unwrap) imports deepspeed
    whenever it is installed, only to check whether the model is a `DeepSpeedEngine`: half a second, and DeepSpeed's
    "Setting accelerator to CPU" warning, on runs that do not use it. No model is an engine before deepspeed is
    imported, so the check is asked only once it is (a DeepSpeed run imports it when its engine is built)."""
    from accelerate.utils import other

    if callable(getattr(other, "is_deepspeed_available", None)):
        other.is_deepspeed_available = _deepspeed_imported


def select_as_accelerator_state(plugin) -> None:
    """Select a DeepSpeed plugin as `AcceleratorState.__init__` does (the test harness's DeepSpeed on CPU)."""
    plugin.select(_from_accelerator_state=True)


# ------------------------------------------------------------------------------------------------ transformers
@contextmanager
def hf_deepspeed_config_cleared() -> Iterator[None]:
    """transformers' global "ZeRO-3 is on" (its weak reference to the DeepSpeed config) cleared inside the block."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


# ------------------------------------------------------------------------------------------------ deepspeed
def is_partitioned(param) -> bool:
    """Whether `param` is a ZeRO-3 parameter (its value lives in `ds_tensor`, one partition per rank)."""
    return hasattr(param, "ds_tensor") and hasattr(param, "ds_id")


def partition_of(param: nn.Parameter) -> torch.Tensor:
    """This rank's partition of a ZeRO-3 parameter (flat, zero-padded at the end), its storage shared."""
    return param.ds_tensor.data


def whole_shape(param: nn.Parameter) -> tuple[int, ...]:
    """A ZeRO-3 parameter's whole shape (its own `shape` is empty outside its module's forward)."""
    return tuple(param.ds_shape)


def at_rest(param: nn.Parameter) -> bool:
    """Whether a ZeRO-3 parameter is not gathered and its partition is stored in its own dtype (not quantized)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE and param.ds_tensor.dtype == param.dtype


def drop_optimizer_reference(param: nn.Parameter) -> None:
    param.__dict__.pop("_z3_optimizer", None)


BACKWARD_ATTRIBUTES = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt", "ds_grads_remaining")


def drop_backward_functions(module: nn.Module) -> None:
    for name in BACKWARD_ATTRIBUTES:
        module.__dict__.pop(name, None)


def parameter_hooks(model: nn.Module, engine):
    """ZeRO-3's parameter hooks (gather before a module's forward and backward, release after) on `model` with
    `engine`'s settings and no optimizer; `.destroy()` takes them off."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    return DeepSpeedZeRoOffload(
        model,
        timers=NoopTimer(),
        ds_config=engine.config,
        overlap_comm=engine.zero_overlap_comm(),
        prefetch_bucket_size=engine.zero_prefetch_bucket_size(),
        max_reuse_distance=engine.zero_max_reuse_distance(),
        max_live_parameters=engine.zero_max_live_parameters(),
        param_persistence_threshold=engine.zero_param_persistence_threshold(),
        model_persistence_threshold=engine.zero_model_persistence_threshold(),
        offload_param_config=engine.zero_offload_param(),
        zero_module_granularity_threshold=engine.zero_module_granularity_threshold(),
    )


def remove_engine_forward_hooks(engine) -> None:
    """The forward hooks a DeepSpeed engine put on its model (its `destroy` removes only its gradient hooks)."""
    for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
        if getattr(engine, hook, None) is not None:
            getattr(engine, hook).remove()
