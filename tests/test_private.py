"""`pm_hf.distributed.private`: every touch of another library's private state still fits the installed libraries,
and no other module of pm_hf touches those names. `CHECKED` records the versions the entries were last read against; a
newer release that changes one fails the entry's own test here (CI installs the newest versions allowed)."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path

import torch

from pm_hf.distributed import private

PM_HF = Path(__file__).resolve().parents[1] / "pm_hf"


def _source(module_name: str) -> str:
    return inspect.getsource(importlib.import_module(module_name))


def test_every_library_of_an_entry_has_a_checked_version():
    assert {e.library for e in private.ENTRIES} <= set(private.CHECKED)


def test_accelerate_marks_a_model_prepared_for_evaluation():
    assert "_is_accelerate_prepared" in _source("accelerate.accelerator")
    model = torch.nn.Linear(2, 2)
    model._is_accelerate_prepared = True
    private.forget_accelerate_prepared(model)
    assert not hasattr(model, "_is_accelerate_prepared")


def test_accelerate_deepspeed_plugin_select_takes_from_accelerator_state():
    from accelerate.utils import DeepSpeedPlugin

    assert "_from_accelerator_state" in inspect.signature(DeepSpeedPlugin.select).parameters


def test_accelerator_state_keeps_its_shared_state_in_a_dict():
    from accelerate.state import AcceleratorState

    assert isinstance(AcceleratorState._shared_state, dict)
    assert private.accelerator_state_exists() == bool(AcceleratorState._shared_state)


def test_accelerate_unwrap_asks_is_deepspeed_available_in_its_own_module():
    from accelerate.utils import other

    assert callable(other.is_deepspeed_available)
    assert not inspect.signature(other.is_deepspeed_available).parameters
    assert "is_deepspeed_available()" in inspect.getsource(other.extract_model_from_parallel)


def test_transformers_zero3_flag_is_its_deepspeed_config_weak_ref():
    from transformers.integrations import deepspeed as hf_deepspeed

    assert hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref")
    assert "_hf_deepspeed_config_weak_ref" in inspect.getsource(hf_deepspeed.is_deepspeed_zero3_enabled)
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = lambda: type("Config", (), {"is_zero3": lambda self: True})()
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with private.hf_deepspeed_config_cleared():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def test_transformers_private_methods_pm_hf_overrides_keep_their_signatures():
    from transformers import HfArgumentParser, Trainer

    from pm_hf.commands.parsing import Parser
    from pm_hf.method.trainer import PerturbationMixin

    load = inspect.signature(Trainer._load_from_checkpoint)
    assert (
        list(load.parameters) == ["self", "resume_from_checkpoint", "model"]
        and load.parameters["model"].default is None
    )
    assert list(inspect.signature(HfArgumentParser._add_dataclass_arguments).parameters) == ["self", "dtype"]
    assert "_load_from_checkpoint" in PerturbationMixin.__dict__ and "_add_dataclass_arguments" in Parser.__dict__


def test_deepspeed_partition_attributes():
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    source = _source("deepspeed.runtime.zero.partition_parameters")
    for name in ("ds_tensor", "ds_shape", "ds_id", "ds_status"):
        assert re.search(rf"\.{name}\s*=", source), name
    assert ZeroParamStatus.NOT_AVAILABLE


def test_deepspeed_optimizer_reference_and_backward_functions():
    stage3 = _source("deepspeed.runtime.zero.stage3")
    assert "_z3_optimizer" in stage3
    sources = stage3 + _source("deepspeed.runtime.zero.parameter_offload")
    for name in private.BACKWARD_ATTRIBUTES:
        assert name in sources, name
    module = torch.nn.Linear(2, 2)
    module.pre_bwd_fn = object()
    private.drop_backward_functions(module)
    assert not hasattr(module, "pre_bwd_fn")


def test_deepspeed_parameter_hooks_take_the_settings_pm_hf_passes():
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    params = inspect.signature(DeepSpeedZeRoOffload.__init__).parameters
    passed = re.findall(r"^\s+(\w+)=engine\.", inspect.getsource(private.parameter_hooks), re.M)
    assert passed and all(name in params for name in [*passed, "timers"])
    assert callable(DeepSpeedZeRoOffload.destroy) and callable(DeepSpeedZeRoOffload.get_param_coordinator)


def test_deepspeed_engine_forward_hooks():
    source = _source("deepspeed.runtime.engine")
    for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
        assert f"self.{hook} =" in source, hook


PRIVATE_NAMES = (
    "_is_accelerate_prepared", "_shared_state", "_hf_deepspeed_config_weak_ref", "_z3_optimizer", "pre_bwd_fn",
    "post_bwd_fn", "ds_grads_remaining", "ds_tensor", "ds_shape", "ds_status", "DeepSpeedZeRoOffload",
    "module_forward_pre_hook", "is_deepspeed_available", "_from_accelerator_state",
)  # fmt: skip


def test_no_other_module_touches_the_private_names():
    touching = {}
    for path in PM_HF.rglob("*.py"):
        if path.name == "private.py":
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings may name them
        found = [name for name in PRIVATE_NAMES if name in code]
        if found:
            touching[str(path.relative_to(PM_HF))] = found
    assert not touching, f"private state touched outside pm_hf/distributed/private.py: {touching}"
