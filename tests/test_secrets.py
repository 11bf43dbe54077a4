"""The token given to push is never written or logged: a run that pushes after every task with its continual state
(mid-task checkpoints on, TensorBoard on), then `pm-hf export` and `pm-hf push` of it, are scanned — every file they
wrote (also the mid-task checkpoints, scanned while they exist), what the Hub stand-in recorded as uploaded (commits,
its cache, its call log), stdout/stderr and every log record at DEBUG — for the token; none holds it."""

import logging
from pathlib import Path

import pytest
from conftest import groups
from hub_standin import FakeHub
from transformers import TrainerCallback

import pm_hf.hub.repository
from pm_hf.commands.cli import main as cli_main
from pm_hf.continual import run_continual

TOKEN = "hf_SeCrEtPushToken0123456789abcdef"
NEEDLES = (TOKEN.encode(), TOKEN[3:].encode())  # also without its `hf_` prefix


def found(data: bytes) -> bool:
    return any(needle in data for needle in NEEDLES)


def scan_files(root: Path) -> tuple[int, list[str]]:
    """(files read, those holding the token) under `root`."""
    files = [p for p in Path(root).rglob("*") if p.is_file()]
    return len(files), [str(p) for p in files if found(p.read_bytes())]


class ScanWhileSaving(TrainerCallback):
    """Scans the run folder at each mid-task save, while the checkpoints that the end of the task removes exist."""

    def __init__(self, out: Path):
        self.out, self.scans, self.leaks = out, 0, []

    def on_save(self, args, state, control, **kwargs):
        n, leaks = scan_files(self.out)
        self.scans += int(any(self.out.glob("tasks/task_*/checkpoint-*")))
        self.leaks += leaks


def test_scanning_finds_the_token_where_it_is(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 10 + TOKEN[3:].encode())
    (tmp_path / "b").write_text("nothing here")
    assert scan_files(tmp_path) == (2, [str(tmp_path / "a")])


@pytest.fixture
def hub(monkeypatch, tmp_path):
    fake = FakeHub(tokens=(TOKEN,), cache_dir=tmp_path / "hf-cache")
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    monkeypatch.setattr(pm_hf.hub.repository, "get_token", lambda: None)
    return fake


@pytest.mark.slow  # a 2-task run saving every step and pushing every task, then export and push (about 30 s)
def test_the_push_token_is_never_written_or_logged(hub, model_dir, tmp_path, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    args = groups(model_dir, out, class_groups=[[0, 1], [2, 3]], max_train_samples_per_class=8,
                  max_eval_samples_per_class=4, push_to_hub=True, hub_token=TOKEN,
                  hub_model_id="me/secret", push_continual_state=True, hub_strategy="every_task",
                  save_strategy="steps", save_steps=1, report_to=["tensorboard"], logging_steps=1)  # fmt: skip
    scanner = ScanWhileSaving(out)
    run_continual(*args, callbacks=[scanner])
    assert cli_main(["export", str(out), "--output", str(tmp_path / "export")]) == 0
    argv = ["push", str(out), "--hub_model_id", "me/later", "--hub_token", TOKEN, "--push_continual_state"]
    assert cli_main(argv) == 0

    assert scanner.scans >= 2 and scanner.leaks == [], scanner.leaks  # the mid-task checkpoints (training_args.bin)
    n, leaks = scan_files(tmp_path)  # run folder, export, TensorBoard events, the stand-in's cache of pushed files
    assert leaks == [] and n > 40
    assert any(tmp_path.rglob("events.out.tfevents*")) and (tmp_path / "export" / "README.md").is_file()
    commits = [commit for repo in hub.repos.values() for commit in repo["commits"].values()]
    pushed = [data for commit in commits for data in commit["files"].values()]
    assert len(hub.commits("me/secret")) == 4 and len(hub.commits("me/later")) == 2  # base + main, per push
    assert not [data[:80] for data in pushed if found(data)]
    assert not found(repr(hub.calls).encode())  # what the stand-in recorded of every call
    printed = capfd.readouterr()
    records = [f"{r.name} {r.getMessage()} {r.args!r} {r.exc_text}" for r in caplog.records]
    assert printed.out and records  # the run did print and log
    assert not found((printed.out + printed.err).encode()) and not [r for r in records if found(r.encode())]
