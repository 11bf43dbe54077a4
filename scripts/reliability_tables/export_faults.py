"""Faults beyond training: `pm-hf export`, `pm-hf push` (through the Hub stand-in), `pm-hf merge` (with and without
data: the checkpoint its loop writes), a `hub_strategy: every_task` run and a `resume_from` download, each stopped at
one point by SIGKILL (a real child process, `os.kill(pid, SIGKILL)`) or a full disk (ENOSPC raised at a write), then
run again.

A row passes when the stopped command did not succeed; no half-written folder sits under the final name (it is
absent, or the older version byte for byte); the rerun succeeds and leaves no temporaries beside it; and its output
equals an uninterrupted run's (`same_folders`: tensors equal, files equal but for the run's timings and peak
memory). A push's record on the stand-in equals an uninterrupted push's, commit for commit (no commit twice, none
partial: `same_record`). A download cut short is fetched again (the folder used is whole) or refused by the
contract. With `quick`, a sample runs in-process, an exception standing in for SIGKILL. The parts (the stand-in kept
on disk, the fault points, the comparisons) are in export_faults_parts.py.

    python scripts/reliability.py export_faults [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # the child process: `python export_faults.py child SPEC`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reliability_tables.common import ROOT, base_config, contract_error, make_assets, run_cli
from reliability_tables.export_faults_parts import (
    REPO,
    TOKEN,
    Killed,
    damaged_download,
    hub_installed,
    install,
    points_restored,
    same_folders,
    same_record,
    stale_beside,
    tree,
)

KIND = "faults"
TITLE = "killed or out of disk mid-command: nothing half-written under its name; the rerun equals an uninterrupted run"


@dataclass
class Case:
    door: str  # export, push, merge, train
    name: str
    command: str  # export, push, merge, merge-data, every-task
    point: str  # a key of export_faults_parts.POINTS
    nth: int = 1  # which call of the point
    how: str = "kill"  # kill (SIGKILL) or disk (ENOSPC)
    existing: bool = False  # the output already holds an older export, which must survive the fault
    quick: bool = False  # in the default tier's sample


def _both(door, name, command, point, nth=1, existing=False, quick=()):
    return [Case(door, f"{name}, {'SIGKILL' if how == 'kill' else 'full disk'}", command, point, nth, how, existing,
                 how in quick) for how in ("kill", "disk")]  # fmt: skip


CASES = [
    *_both("export", "in the adapter write", "export", "adapter", quick=("kill",)),
    *_both("export", "before the card", "export", "card"),
    *_both("export", "over an older export, before the card", "export", "card", existing=True, quick=("disk",)),
    Case("export", "complete, before the rename, SIGKILL", "export", "rename"),
    Case("export", "over an older export, after the swap, SIGKILL", "export", "swap", existing=True),
    Case(
        "export",
        "over an older export, no RENAME_EXCHANGE, old one moved aside, SIGKILL",
        "export",
        "aside",
        existing=True,
    ),  # fmt: skip
    *_both("push", "while exporting for the push", "push", "push-export"),
    Case("push", "after the base branch's commit, SIGKILL", "push", "commit-after", 1),
    *_both("push", "in the upload, before the commit lands", "push", "commit-before", 2),  # disk: the client's cache
    Case("push", "after the commit landed, SIGKILL", "push", "commit-after", 2, quick=True),
    *_both("push", "every_task: before task 2's push", "every-task", "push-export", 2),
    Case("push", "every_task: after task 2's base commit, SIGKILL", "every-task", "commit-after", 3),
    Case("push", "every_task: in task 2's upload, full disk", "every-task", "commit-before", 3, "disk"),
    Case(
        "push", "every_task: after task 2's commit, before its tag, SIGKILL", "every-task", "tag-before", 2
    ),  # fmt: skip
    *_both("merge", "in the adapter write", "merge", "adapter", quick=("kill",)),
    *_both("merge", "before the card", "merge", "card"),
    *_both("merge", "over an older merge, in the adapter write", "merge", "adapter", existing=True),
    *_both("merge", "with data: in the loop's checkpoint write", "merge-data", "checkpoint"),
    *_both("merge", "with data: in the export", "merge-data", "adapter"),
]
DOWNLOADS = {  # name -> (damage, every download or the first only)
    "resume_from: a checkpoint file cut short once": ("truncate", False),
    "resume_from: an adapter record missing once": ("drop", False),
    "resume_from: latest.json missing every time": ("drop-latest", True),
    "resume_from: a checkpoint file cut short every time": ("truncate", True),
}
QUICK_DOWNLOADS = ("resume_from: an adapter record missing once", "resume_from: latest.json missing every time")


# ------------------------------------------------------------------------------------------------ inputs
def prepare(work: Path, quick: bool = False) -> dict:
    """The assets, a finished run that pushed every task (3 tasks, quick: 2; the every_task reference, whose folder
    the other commands read), two plain PEFT adapters of the tiny BERT, the merge's data config, and every other
    command's uninterrupted output (the references)."""
    work.mkdir(parents=True, exist_ok=True)
    assets = make_assets(work / "assets")
    refs = work / "references"
    groups = [[0, 1], [2, 3]] if quick else [[0, 1], [2, 3], [4, 5]]
    every = base_config(assets, work / "x", push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN, class_groups=groups,
                        hub_strategy="every_task", push_continual_state=True)  # fmt: skip
    setup = {"work": str(work), "assets": assets, "run": str(refs / "every-task" / "out"), "every_task": every}
    setup["adapters"] = [_peft_adapter(assets["model"], work / f"adapter_{i}", i) for i in range(2)]
    (work / "merge.yaml").write_text(json.dumps(base_config(assets, work / "unused", class_groups=[[0, 1], [2, 3]])))
    setup["merge_config"] = str(work / "merge.yaml")
    for command in ("every-task", "export", "push", "merge", "merge-data"):
        folder = refs / command
        folder.mkdir(parents=True)
        argv = command_argv(Case("ref", "reference", command, "none"), setup, folder)
        with hub_installed(folder / "hub"):
            code, err = run_cli(argv)
        assert code == 0, f"the reference {command}: {err[-300:]}"
    setup["refs"] = str(refs)
    return setup


def _peft_adapter(model: str, folder: Path, seed: int) -> str:
    """A SEQ_CLS adapter as plain PEFT saves it (LoRA factors and the head moved away from the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=6, ignore_mismatched_sizes=True)
    peft = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape) * 0.3)
    peft.save_pretrained(folder)
    return str(folder)


def command_argv(case: Case, setup: dict, folder: Path) -> list[str]:
    """The command of a case, writing into `folder` (its output: folder/out)."""
    out = str(folder / "out")
    if case.command == "export":
        return ["export", setup["run"], "--output", out]
    if case.command == "push":
        return ["push", setup["run"], "--hub_model_id", REPO, "--hub_token", TOKEN, "--push_continual_state"]
    if case.command == "merge":
        return ["merge", "--adapters", *setup["adapters"], "--merge_method", "task-arithmetic", "--output", out]
    if case.command == "merge-data":
        return ["merge", "--adapters", *setup["adapters"], "--config", setup["merge_config"], "--output", out]
    config = folder / "every_task.yaml"
    if not config.exists():
        config.write_text(json.dumps({**setup["every_task"], "output_dir": out}))
    return ["train", "--config", str(config)]


def _older_output(case: Case, setup: dict, folder: Path) -> None:
    """An older export under the output's name: a merged-model export of the run, or a merge by another rule."""
    if case.command == "export":
        argv = ["export", setup["run"], "--output", str(folder / "out"), "--mode", "merged"]
    else:
        argv = ["merge", "--adapters", *setup["adapters"], "--merge_method", "average", "--output", str(folder / "out")]
    code, err = run_cli(argv)
    assert code == 0, f"the older output: {err[-300:]}"


# ------------------------------------------------------------------------------------------------ one case
def run_case(case: Case, setup: dict, folder: Path, in_process: bool) -> tuple[bool, str]:
    folder.mkdir(parents=True)
    if case.existing:
        _older_output(case, setup, folder)
    before = tree(folder / "out") if (folder / "out").exists() else None
    argv = command_argv(case, setup, folder)
    code, detail = _stopped(case, argv, folder, in_process)
    if code == 0:
        return False, f"the fault did not happen ({detail})"
    stop = "killed" if code == -9 else f"stopped (exit {code})"
    out, ref = folder / "out", Path(setup["refs"]) / case.command
    if case.command != "every-task" and (tree(out) if out.exists() else None) != before:
        aside = [p for p in folder.iterdir() if p.name.startswith(".out.old-")]
        if not out.exists() and aside and tree(aside[0]) == before:  # no exchange: the next writer puts it back
            stop += ", the old version moved aside whole"
        else:
            whole, what = same_folders(out, ref / "out")  # the new version, complete, may have replaced the old one
            if not whole:
                return False, f"after the fault the output is neither the old one nor the new one: {what}"
            stop += ", the new version already in place"
    again = argv + (["--resume"] if case.command == "every-task" else [])
    with hub_installed(folder / "hub"):
        code, err = run_cli(again)
    if code != 0:
        return False, f"the rerun failed (exit {code}): {err[-300:]}"
    left = stale_beside(out)
    if left:
        return False, f"temporaries left beside the output: {left[:3]}"
    if case.command in ("push", "every-task"):
        ok, pushed = same_record(folder / "hub", ref / "hub")
        if not ok or case.command == "push":
            return ok, pushed if not ok else f"{stop}; rerun: {pushed}"
    sub = "merged_adapter" if case.command == "every-task" else ""  # a run's own export
    ok, what = same_folders(out / sub, ref / "out" / sub)
    if case.command == "every-task":
        what = f"{pushed}; its export: {what}"
    return ok, what if not ok else f"{stop}; rerun equal: {what}"


def _stopped(case: Case, argv: list[str], folder: Path, in_process: bool) -> tuple[int, str]:
    """Run the command with the fault installed: in this process (an exception for SIGKILL), or in a child killed
    with SIGKILL at the point. Returns (exit code, what happened); -9 for a kill."""
    if in_process:
        with points_restored(), hub_installed(folder / "hub"):
            install(case.point, case.nth, case.how, _raise_killed)
            try:
                code, err = run_cli(argv)
            except Killed:
                return -9, "killed"
            except OSError as err:
                return 3, f"OSError {err.errno}"
            return code, err[-200:]
    spec = folder / "child.json"
    spec.write_text(json.dumps({"argv": argv, "case": asdict(case), "hub": str(folder / "hub")}))
    done = subprocess.run([sys.executable, __file__, "child", str(spec)], capture_output=True, text=True)
    return done.returncode, done.stderr.strip()[-300:]


def _raise_killed():
    raise Killed("the fault point")


def _child(spec_path: str) -> int:
    """A child process: the command with the fault installed, SIGKILL at the point."""
    import signal

    spec = json.loads(Path(spec_path).read_text())
    case = Case(**spec["case"])
    with hub_installed(Path(spec["hub"])):
        install(case.point, case.nth, case.how, lambda: os.kill(os.getpid(), signal.SIGKILL))
        try:
            return run_cli(spec["argv"])[0]
        except OSError:
            return 3  # the full disk: the command ends with the error


# ------------------------------------------------------------------------------------------------ downloads
def run_download(name: str, setup: dict, folder: Path) -> tuple[bool, str]:
    """A `resume_from` whose download of continual_state/ arrives damaged (once, or every time): the state used is
    whole and equals what was pushed, or `pm-hf train` refuses with `resume_from = ...` before writing anything."""
    from pm_hf.hub.repository import download_state

    damage, always = DOWNLOADS[name]
    folder.mkdir(parents=True)
    hub = Path(setup["refs"]) / "every-task" / "hub"
    shutil.copytree(hub, folder / "hub")
    with hub_installed(folder / "hub") as fake, damaged_download(damage, always, folder / "downloads"):
        pushed = {p[len("continual_state/") :]: b for p, b in fake.files(REPO, "task-2").items()
                  if p.startswith("continual_state/")}  # fmt: skip
        if always:
            out = folder / "run"
            config = folder / "resume.yaml"
            config.write_text(json.dumps({**setup["every_task"], "push_to_hub": False, "output_dir": str(out),
                                          "resume_from": f"{REPO}@task-2"}))  # fmt: skip
            code, err = run_cli(["train", "--config", str(config)])
            ok, line = contract_error(code, err, "resume_from")
            if ok and out.exists():
                return False, f"refused, but {out} was created"
            return ok, line
        got = download_state(f"{REPO}@task-2", TOKEN)
        have = {str(p.relative_to(got)): p.read_bytes() for p in got.rglob("*") if p.is_file()}
        if have != pushed:
            return False, f"the state used differs from the pushed one: {sorted(set(have) ^ set(pushed))[:3]}"
        return True, "downloaded again: the state used is the pushed one, byte for byte"


# ------------------------------------------------------------------------------------------------ the table
def rows(work: Path, quick: bool) -> list[tuple[str, str, bool, str]]:
    """Every case (quick: the sample, in-process), each (door, case, ok, detail)."""
    setup = prepare(work, quick)
    out = []
    for i, case in enumerate(c for c in CASES if c.quick or not quick):
        try:
            ok, detail = run_case(case, setup, work / f"case{i}", in_process=quick)
        except Exception as err:  # noqa: BLE001  (a case that crashes is a failing row)
            ok, detail = False, f"raised {type(err).__name__}: {err}"
        out.append((case.door, case.name, ok, detail))
    for i, name in enumerate(n for n in DOWNLOADS if n in QUICK_DOWNLOADS or not quick):
        try:
            ok, detail = run_download(name, setup, work / f"download{i}")
        except Exception as err:  # noqa: BLE001
            ok, detail = False, f"raised {type(err).__name__}: {err}"
        out.append(("train", name, ok, detail))
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(_k, "1")
    sys.exit(_child(sys.argv[2]))

__all__ = ["CASES", "DOWNLOADS", "KIND", "ROOT", "TITLE", "rows"]
