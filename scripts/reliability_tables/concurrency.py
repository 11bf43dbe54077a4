"""Concurrent use of one run folder and one Hub repository: a second `train` on a folder a live process holds is
refused at once (and a killed process's lock holds nothing); `evaluate`, `export` and `push` of a run that is training
read its last complete checkpoint — compared with a copy of that checkpoint taken while the run was paused — and never
wait on it; two pushes to one repository land whole, one after the other; a repository holding another sequence's
continual state is not pushed over unless `overwrite_hub_state`. The Hub is the recording stand-in of the tests
(`tests/hub_standin.py`), which answers as the real client does."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import yaml

from .common import ROOT, _tree, base_config, contract_error, make_assets, run_cli

KIND = "concurrency"
TITLE = "a second process is refused or reads a consistent checkpoint, never a mix, never blocking the run"
HOLD = (
    "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
    "print('held', flush=True); time.sleep(600)"
)  # the lock object kept: a collected FileLock releases


def _standin():
    sys.path.insert(0, str(ROOT / "tests")) if str(ROOT / "tests") not in sys.path else None
    import hub_standin

    return hub_standin


@contextlib.contextmanager
def fake_hub(cache: Path):
    """The stand-in Hub (its files under `cache`) in place of `HfApi` where pm_hf makes its client; yields (hub,
    a token with write access)."""
    import pm_hf.hub.repository as repository

    standin = _standin()
    hub = standin.FakeHub(cache_dir=cache)
    saved = repository.HfApi, repository.get_token
    repository.HfApi, repository.get_token = hub.api, lambda: None
    try:
        yield hub, standin.GOOD_TOKEN
    finally:
        repository.HfApi, repository.get_token = saved


cli = run_cli  # `pm-hf <argv>` in this process: (exit code, stderr)


def write_config(assets: dict, out: Path, **fields) -> Path:
    config = out.parent / f"{out.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(base_config(assets, out, **fields)))
    return config


# ------------------------------------------------------------------------------------------------ the run folder's lock
@contextlib.contextmanager
def holder(out: Path):
    """Another live process holding `out`'s lock (as a training run does); killed on exit (SIGKILL: no release)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out / ".pm_hf.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def lock_rows(assets: dict, work: Path, quick: bool) -> list:
    rows = []
    out = work / "held"
    with holder(out):
        (out / "keep.txt").write_text("the other process's file")
        before = _tree(out)
        config = write_config(assets, out, class_groups=[[0, 1]])
        for flags, case in [([], "a second train"), (["--resume"], "a second train --resume")][: 1 if quick else 2]:
            code, err = cli(["train", "--config", str(config), *flags])
            ok, detail = contract_error(code, err, "output_dir")
            ok = ok and "in use" in detail and _tree(out) == before
            rows.append(("train", f"{case} on a folder a live process holds", ok, detail))
        if not quick:
            code, err = cli(["check", str(config)])
            ok, detail = contract_error(code, err, "output_dir")
            rows.append(("check", "check of a folder a live process holds", ok and _tree(out) == before, detail))
    out = work / "stale"
    with holder(out):
        pass  # killed: its lock file stays, holding nothing
    config = write_config(assets, out, class_groups=[[0, 1]])
    if quick:  # train's own check of the folder, without the training
        code, err = cli(["check", str(config)])
        rows.append(("check", "check where a killed process left its lock file", code == 0, f"exit {code}"))
        return rows
    code, err = cli(["train", "--config", str(config)])
    ok = code == 0 and (out / "latest.json").is_file() and (out / ".pm_hf.lock").is_file()
    rows.append(("train", "train where a killed process left its lock file", ok, f"exit {code}"))
    return rows


# ------------------------------------------------------------------------------------------------ readers of a live run
class Pause:
    """Stops the training thread inside `module.name` (before the call) at its `nth` call: `reached` is set, the
    thread waits for `go`."""

    def __init__(self, module, name: str, nth: int):
        self.module, self.name, self.nth, self.calls = module, name, nth, 0
        self.original = getattr(module, name)
        self.reached, self.go = threading.Event(), threading.Event()

        def paused(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth:
                self.reached.set()
                self.go.wait(600)
            return self.original(*args, **kwargs)

        setattr(module, name, paused)

    def restore(self) -> None:
        setattr(self.module, self.name, self.original)
        self.go.set()


def _train_in_thread(config: Path) -> tuple[threading.Thread, dict]:
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    box: dict = {}

    def target():
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                box["results"] = run_continual(*parse_config(str(config), []))
        except BaseException as err:  # reported by the rows
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _frozen(out: Path, dest: Path) -> dict:
    """A copy of the paused run folder (the reference a reader must match) and what its checkpoint holds."""
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns(".pm_hf.lock", ".*tmp-*"))
    latest = json.loads((dest / "latest.json").read_text())
    folder = dest / latest["checkpoint"]
    files = {f"{folder.name}/{p.name}": p.read_bytes() for p in folder.iterdir()}
    return {"dir": dest, "latest": latest, "files": files}


def _pushed_state_matches(hub, repo: str, frozen: dict) -> tuple[bool, str]:
    files = hub.files(repo)
    state = {k.split("/", 1)[1]: v for k, v in files.items() if k.startswith("continual_state/")}
    completed = frozen["latest"]["completed"]
    adapters = sorted(k for k in state if k.startswith("adapters/"))
    results = json.loads(state.get("results.json", b"{}"))
    checks = {
        "latest.json": json.loads(state.get("latest.json", b"{}")) == frozen["latest"],
        "checkpoint": {k: v for k, v in state.items() if k.startswith("checkpoint-")} == frozen["files"],
        "adapter log": adapters == [f"adapters/task_{t}.safetensors" for t in range(completed)],
        "results.json": len(results.get("alphas", [])) == completed,
        "export": len(json.loads(files["results.json"])["alphas"]) == completed,
    }
    bad = [k for k, ok in checks.items() if not ok]
    return not bad, f"after task {completed}: " + ("consistent" if not bad else f"differs in {bad}")


def _guarded(door: str, case: str, check: Callable[[], tuple[bool, str]]) -> tuple:
    """A row from `check`; a reader that waits, is refused or reads a damaged state fails it."""
    try:
        ok, detail = check()
    except Exception as err:
        ok, detail = False, f"{type(err).__name__}: {err}"[:300]
    return door, case, ok, detail


def _evaluate_check(out: Path, frozen_dir: Path) -> tuple[bool, str]:
    from pm_hf.run.runs import evaluate_run

    results = (out / "results.json").read_bytes()
    live, ref = evaluate_run(str(out)), evaluate_run(str(frozen_dir))
    same = live["last_row"] == ref["last_row"] and live["saved_last_row"] == ref["saved_last_row"]
    untouched = (out / "results.json").read_bytes() == results  # the training run's own file is left to it
    return same and untouched, f"row {live['last_row']} as the copy's; the run's results.json untouched: {untouched}"


def _export_check(out: Path, frozen_dir: Path, work: Path) -> tuple[bool, str]:
    from pm_hf.run.runs import export_run_dir

    export_run_dir(str(out), work / "export")
    export_run_dir(str(frozen_dir), work / "export-of-the-copy")
    names = ("adapter_model.safetensors", "adapter_config.json")
    same = all((work / "export" / n).read_bytes() == (work / "export-of-the-copy" / n).read_bytes() for n in names)
    return same, "the adapter equals the export of the checkpoint's copy" if same else "the adapter differs"


def _push_check(out: Path, hub, token: str, repo: str, frozen: dict) -> tuple[bool, str]:
    from pm_hf.run.runs import push_run_dir

    push_run_dir(str(out), repo, token=token, push_continual_state=True)
    return _pushed_state_matches(hub, repo, frozen)


def _readers(out: Path, work: Path, hub, token: str, frozen: dict, label: str, quick: bool) -> list:
    """evaluate (not in the quick sample), export and push of the paused run, each compared with the same done on
    the frozen copy (`frozen["dir"]`)."""
    work.mkdir(parents=True)
    repo = "me/live-" + "-".join(label.split())
    rows = [] if quick else [_guarded("evaluate", f"evaluate of a training run ({label})",
                                      lambda: _evaluate_check(out, frozen["dir"]))]  # fmt: skip
    rows.append(
        _guarded("export", f"export of a training run ({label})", lambda: _export_check(out, frozen["dir"], work))
    )
    rows.append(_guarded("push", f"push of a training run with its continual state ({label})",
                         lambda: _push_check(out, hub, token, repo, frozen)))  # fmt: skip
    return rows


def live_rows(assets: dict, work: Path, quick: bool) -> list:
    """A 3-task run paused inside its writes while readers run: before checkpoint 2 is written (task 2's adapter
    record already there), and between checkpoint 2 and its results.json; then a reader that took its view before
    the run replaced that checkpoint."""
    import pm_hf.run.loop as loop_module
    from pm_hf.run.checkpoint import load_checkpoint
    from pm_hf.run.rundir import checkpoint_view

    out = work / "live"
    config = write_config(assets, out, class_groups=[[0, 1], [2, 3]] if quick else [[0, 1], [2, 3], [4, 5]])
    points = [("before checkpoint 2", "save_checkpoint", 2)]
    points += [] if quick else [("between checkpoint 2 and results.json", "write_outputs", 2)]
    rows = []
    with fake_hub(work / "hf-cache") as (hub, token):
        pauses = [Pause(loop_module, name, nth) for _, name, nth in points]
        thread, box = _train_in_thread(config)
        try:
            for (label, _, _), pause in zip(points, pauses):
                if not pause.reached.wait(300):
                    return [("api", "a paused training run", False, f"never reached {label}: {box.get('error')}")]
                frozen = _frozen(out, work / f"frozen-{len(rows)}")
                rows += _readers(out, work / f"read-{len(rows)}", hub, token, frozen, label, quick)
                if pause is pauses[-1] and not quick:  # a view taken now, read after the run moved on
                    with checkpoint_view(out) as view:
                        pause.restore()
                        thread.join(600)
                        state, _ = load_checkpoint(view)
                        gone = not (out / frozen["latest"]["checkpoint"]).exists()
                        ok = gone and state.completed == frozen["latest"]["completed"]
                    detail = f"read task {state.completed}'s checkpoint after the run removed it: {gone}"
                    rows.append(("api", "a view outlives the checkpoint the run replaced", ok, detail))
                pause.restore()
        finally:
            for pause in pauses:
                pause.restore()
            thread.join(600)
    tasks = 2 if quick else 3
    finished = "results" in box and len(box["results"]["alphas"]) == tasks
    rows.append(("train", "the run the readers read goes on to its end", finished, str(box.get("error", tasks))))
    return rows


# ------------------------------------------------------------------------------------------------ the Hub repository
def _export(folder: Path, tag: str, config: dict, n: int = 6) -> Path:
    """A small export folder: `n` files stamped `tag` and a results.json with the run record `config`."""
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"file_{i}.bin").write_text(f"{tag}-{i}")
    (folder / "results.json").write_text(json.dumps({"config": config, "alphas": [0.5]}))
    return folder


def _state(folder: Path, config: dict) -> dict[str, Path]:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"config": config}))
    (folder / "latest.json").write_text(json.dumps({"checkpoint": "checkpoint-task1", "completed": 1}))
    return {"results.json": folder / "results.json", "latest.json": folder / "latest.json"}


def _target(hub, token: str, repo: str, overwrite: bool = False):
    from types import SimpleNamespace

    from pm_hf.hub.repository import connect

    args = SimpleNamespace(hub_model_id=repo, hub_token=token, hub_private_repo=None, hub_revision=None,
                           output_dir="run", overwrite_hub_state=overwrite)  # fmt: skip
    return connect(args)


def _refused(call: Callable, field: str) -> tuple[bool, str]:
    from pm_hf.errors import InputError

    try:
        call()
    except InputError as err:
        return str(err).startswith(f"{field} = "), str(err)[:200]
    return False, "accepted"


SEQ_A = {"fingerprints": {"model": "m1", "tasks": ["a", "b"]}, "MergeArguments": {"merge_method": "pm"}}
SEQ_A_LONGER = {**SEQ_A, "fingerprints": {"model": "m1", "tasks": ["a", "b", "c"]}}
SEQ_B = {**SEQ_A, "fingerprints": {"model": "m1", "tasks": ["x", "y"]}}
SEQ_C = {**SEQ_A, "MergeArguments": {"merge_method": "ties"}}


def hub_rows(work: Path, quick: bool) -> list:
    from pm_hf.hub.repository import push_run

    rows = []
    with fake_hub(work / "hf-cache") as (hub, token):
        pushes = {f"p{i}": _export(work / f"export-{i}", f"p{i}", SEQ_A) for i in range(2 if quick else 4)}
        barrier, errors = threading.Barrier(len(pushes)), []

        def push(name):
            barrier.wait()
            try:
                push_run(_target(hub, token, "me/race"), pushes[name], None, f"push {name}", "task-1")
            except Exception as err:
                errors.append(err)

        threads = [threading.Thread(target=push, args=(n,)) for n in pushes]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        commits = hub.commits("me/race")
        whole = all({v.decode().split("-")[0] for k, v in c["files"].items() if k.startswith("file_")}
                    == {c["message"].split()[-1]} for c in commits)  # fmt: skip
        linear = [c["parent"] for c in commits] == [None, *(hub_oid(hub, c) for c in commits[:-1])]
        tag = hub.repos["me/race"]["tags"]["task-1"] == hub.repos["me/race"]["branches"]["main"]
        ok = not errors and len(commits) == len(pushes) and whole and linear and tag
        detail = f"{len(commits)} commits, each one push's files whole: {whole}, linear: {linear}, tag on the last"
        rows.append(("push", f"{len(pushes)} pushes to one repository at once", ok, detail + f" {errors[:1]}"))

        # another writer lands between the push's reading of the branch and its commit: the Hub refuses (412)
        target = _target(hub, token, "me/race")
        real_commit = target.api.create_commit

        def another_commit_first(*args, **kwargs):
            hub.api(token=token).create_commit("me/race", [], commit_message="someone else's commit")
            return real_commit(*args, **kwargs)

        target.api.create_commit = another_commit_first
        before = len(hub.commits("me/race"))
        export = _export(work / "export-late", "late", SEQ_A)
        ok, detail = _refused(lambda: push_run(target, export, None, "late", None), "hub_model_id")
        ok = ok and "changed on the Hub" in detail and len(hub.commits("me/race")) == before + 1  # only the other's
        rows.append(("push", "a push whose branch moved meanwhile (412)", ok, detail))

        # another sequence's continual state
        push_run(_target(hub, token, "me/seq"), _export(work / "seq-a", "a", SEQ_A), _state(work / "st-a", SEQ_A),
                 "sequence A", None)  # fmt: skip
        cases = [("other data", SEQ_B), ("another merge method", SEQ_C)][: 1 if quick else 2]
        for name, config in cases:
            before = hub.files("me/seq")
            export = _export(work / f"seq-{name}", name, config)
            for state in (_state(work / f"st-{name}", config), None):
                what = "with" if state else "without"
                push = lambda e=export, s=state: push_run(_target(hub, token, "me/seq"), e, s, "b", None)  # noqa: E731
                ok, detail = _refused(push, "hub_model_id")
                ok = ok and "overwrite_hub_state" in detail and hub.files("me/seq") == before
                rows.append(("push", f"over another sequence's state ({name}), {what} its own state", ok, detail))
        export = _export(work / "seq-longer", "longer", SEQ_A_LONGER)
        push_run(_target(hub, token, "me/seq"), export, _state(work / "st-longer", SEQ_A_LONGER), "longer", None)
        ok = b"longer-0" in hub.files("me/seq").values()
        rows.append(("push", "the same sequence, longer, pushes over its own state", ok, "accepted" if ok else "no"))
        export = _export(work / "seq-forced", "forced", SEQ_B)
        push_run(_target(hub, token, "me/seq", overwrite=True), export, None, "forced", None)
        files = hub.files("me/seq")
        ok = b"forced-0" in files.values() and not any(k.startswith("continual_state/") for k in files)
        rows.append(("push", "overwrite_hub_state replaces another sequence's state", ok, "replaced" if ok else "no"))
    return rows


def hub_oid(hub, commit: dict) -> str:
    return next(oid for repo in hub.repos.values() for oid, c in repo["commits"].items() if c is commit)


def rows(work: Path, quick: bool) -> list:
    work.mkdir(parents=True, exist_ok=True)
    assets = make_assets(work / "assets")
    return [*lock_rows(assets, work / "lock", quick), *hub_rows(work / "hub", quick),
            *live_rows(assets, work / "live", quick)]  # fmt: skip
