"""`pm_hf.distributed.placement`: one value per run says where its weights live; the method code never asks which
launch mode runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pm_hf.distributed.placement import Replicated, ShardedRows, ZeRO3Rows, detect, for_run, place, placement_of
from pm_hf.method.adapters import attach_lora
from pm_hf.testing import tiny_bert_folder

PM_HF = Path(__file__).resolve().parents[1] / "pm_hf"
LAUNCH_MODE = re.compile(r"is_sharded|is_partitioned|model_sharding|DTensor|deepspeed|zero3\.")


def test_the_method_code_has_no_branch_on_the_launch_mode():
    core = [*(PM_HF / "method").rglob("*.py"), *(PM_HF / "heads").rglob("*.py"), PM_HF / "run" / "loop.py"]
    found = []
    for path in core:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if LAUNCH_MODE.search(code):
                found.append(f"{path.relative_to(PM_HF)}:{n}: {line.strip()}")
    assert not found, found


def test_a_plain_model_is_replicated_and_a_run_asking_for_fsdp_gets_rows():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    assert type(detect(model)) is Replicated and detect(model).name == "none"
    assert type(for_run(model, fsdp=False)) is Replicated
    assert type(for_run(model, fsdp=True)) is ShardedRows
    assert issubclass(ZeRO3Rows, ShardedRows) and ZeRO3Rows.name == "zero3"


def test_the_placement_attached_once_is_read_through_peft_and_ddp_style_wrappers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pm_hf.config.groups import LoraArguments

    folder = tiny_bert_folder(tmp_path / "bert", ["a b c d e f"] * 4)
    base = AutoModelForSequenceClassification.from_pretrained(folder)
    chosen = place(base, ShardedRows())  # as a run that asked for FSDP, before its first Trainer shards it
    model = attach_lora(base, LoraArguments(r=2))
    assert placement_of(model) is chosen and placement_of(base) is chosen

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert placement_of(Wrapper(model)) is chosen


def test_replicated_and_unsharded_rows_read_and_write_plain_tensors():
    for placement in (Replicated(), ShardedRows()):
        w = torch.arange(6.0).view(3, 2)
        assert placement.whole(w) is w and placement.local_rows(w) is w and placement.row_range(w) == (0, 3)
        assert placement.scalar(w.sum()) == 15.0 and placement.all_finite(w)
        assert torch.equal(placement.keep_rows(w, [1]), torch.tensor([[0.0, 0], [2, 3], [0, 0]]))
        assert placement.zeros(w).shape == (3, 2) and not placement.splits({"w": w})
        placement.write(w, torch.ones(3, 2))
        assert torch.equal(w, torch.ones(3, 2))
        A, B = torch.randn(2, 5), torch.randn(3, 2)
        assert torch.equal(placement.lora_delta(A, B, 0.5, w, False), (B @ A) * 0.5)
        assert torch.equal(placement.lora_delta(A, B, 0.5, w, True), ((B @ A) * 0.5).T)
