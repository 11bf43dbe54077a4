"""Concurrent use (scripts/reliability_tables/concurrency.py, its quick sample here and the whole table in the slow
tier), and the pieces it rests on: the lock probe that refuses a folder a live process holds, the checkpoint view a
reader takes while a writer keeps saving (never a half-written checkpoint, never files of two tasks), and the Hub
stand-in's precondition on `parent_commit`."""

import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hub_standin import GOOD_TOKEN, FakeHub
from huggingface_hub import CommitOperationAdd
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file

from pm_hf.config.checks import InputError
from pm_hf.fileio import atomic_write, atomic_write_text
from pm_hf.run.checkpoint import ContinualState, load_checkpoint, save_checkpoint
from pm_hf.run.rundir import check_claim, checkpoint_view, in_use

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
table = importlib.import_module("reliability_tables.concurrency")


def _failed(rows) -> list:
    return [row for row in rows if not row[2]]


def test_the_quick_concurrency_table_passes(tmp_path):
    rows = table.rows(tmp_path, quick=True)
    doors = {row[0] for row in rows}
    assert {"train", "check", "push", "export"} <= doors and len(rows) >= 10
    assert not _failed(rows), _failed(rows)


@pytest.mark.slow
def test_the_whole_concurrency_table_passes(tmp_path):
    rows = table.rows(tmp_path, quick=False)
    assert len(rows) >= 20 and not _failed(rows), _failed(rows)


def test_a_folder_held_by_a_live_process_is_refused_and_a_dead_ones_lock_is_free(tmp_path):
    out = tmp_path / "run"
    with table.holder(out) as proc:
        assert in_use(out)
        with pytest.raises(InputError, match=r"^output_dir = .*in use by another pm_hf process"):
            check_claim(out, resume=True, overwrite=True)
        assert proc.poll() is None  # the holder lives: the probe took nothing from it
    assert (out / ".pm_hf.lock").is_file() and not in_use(out)  # SIGKILLed: its lock file holds nothing
    check_claim(out, resume=False, overwrite=False)
    assert not in_use(tmp_path / "none") and not (tmp_path / "none").exists()  # a probe creates nothing


def _save(out: Path, t: int) -> None:
    """What the loop writes after task t, in its order: the adapter record, the checkpoint, then results.json and
    a plot; every tensor and record carries t, so a reader can tell the tasks apart."""
    atomic_write(out / "adapters" / f"task_{t}.safetensors", lambda tmp: save_file({"t": torch.full((64,), t)}, tmp))
    state = ContinualState(t + 1, {"w": torch.full((256,), float(t + 1))}, log=[{"task": j} for j in range(t + 1)])
    save_checkpoint(out, state, {"completed": t + 1})
    atomic_write_text(out / "results.json", json.dumps({"alphas": [0.5] * (t + 1)}))
    atomic_write_text(out / "accuracy_matrix.png", str(t + 1))


def test_a_view_taken_while_a_writer_saves_holds_one_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    _save(out, 0)
    done = threading.Event()

    def writer():
        for t in range(1, 40):
            _save(out, t)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        while not done.is_set():
            with checkpoint_view(out) as view:
                assert view != out
                state, config = load_checkpoint(view)  # verified against its manifest: complete
                n = state.completed
                assert config == {"completed": n} and torch.equal(state.weights["w"], torch.full((256,), float(n)))
                assert sorted(p.name for p in (view / "adapters").iterdir()) == sorted(
                    f"task_{t}.safetensors" for t in range(n)
                )  # the records of its tasks, not the next task's
                assert {p.name for p in view.iterdir()} == {"latest.json", f"checkpoint-task{n}", "adapters"}
                seen.append(n)
    finally:
        thread.join()
    assert len(seen) >= 3 and len(set(seen)) >= 2  # views were taken while the writer moved on
    assert not [p for p in out.iterdir() if p.name.startswith(".view")]  # every view removed


def test_a_view_a_killed_reader_left_is_removed_by_the_next_reader(tmp_path):
    """A reader killed in `export` leaves its view in the run folder, which no finished run's `train` cleans: the next
    view there removes it; a live reader's view stays."""
    out = tmp_path / "run"
    _save(out, 0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = out / f".view.tmp-{dead.pid}-abc"
    (left / "x").mkdir(parents=True)
    live = out / f".view.tmp-{os.getppid()}-abc"
    live.mkdir()
    with checkpoint_view(out):
        pass
    assert not left.exists() and live.exists()


def test_a_view_of_a_folder_without_checkpoint_is_the_folder(tmp_path):
    with checkpoint_view(tmp_path) as view:
        assert view == tmp_path and list(tmp_path.iterdir()) == []


def test_the_stand_in_refuses_a_commit_on_a_moved_branch_as_the_hub_does(tmp_path):
    hub = FakeHub(cache_dir=tmp_path)
    api = hub.api(token=GOOD_TOKEN)
    api.create_repo("me/x")
    (tmp_path / "f").write_text("1")
    first = api.create_commit("me/x", [CommitOperationAdd("f", str(tmp_path / "f"))], commit_message="1").oid
    second = api.create_commit("me/x", [], commit_message="2", parent_commit=first).oid
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit("me/x", [], commit_message="3", parent_commit=first)
    assert err.value.response.status_code == 412 and [c["message"] for c in hub.commits("me/x")] == ["1", "2"]
    assert hub.repos["me/x"]["branches"]["main"] == second
    with pytest.raises(ValueError):
        api.create_commit("me/x", [], commit_message="4", parent_commit="not-an-oid")


def test_a_trainer_on_a_held_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from pm_hf import ContinualTrainer, PMConfig

    loads = []
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a)))  # fmt: skip
    out = tmp_path / "run"
    task = {"train": [{"text": "a", "label": 0}], "test": [{"text": "a", "label": 0}]}
    with table.holder(out):
        with pytest.raises(InputError, match=r"^args\.output_dir = .*in use by another pm_hf process"):
            ContinualTrainer("some/model", PMConfig(output_dir=str(out), use_cpu=True, report_to=[]), tasks=[task])
    assert not loads and [p.name for p in out.iterdir()] == [".pm_hf.lock"]
