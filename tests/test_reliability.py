"""Runs that can be trusted (the tables of scripts/reliability.py, in-process): every bad config fails cleanly before
anything is written, a damaged checkpoint is refused, a run stopped at any step resumes to identical results, a
resume with another config or other data is refused, divergence stops the run with its last checkpoint intact, and
the run folder belongs to one run."""

import contextlib
import importlib.util
import io
import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, TrainerCallback

import pm_hf
from pm_hf.commands.cli import main
from pm_hf.config.checks import InputError
from pm_hf.config.groups import MergeArguments
from pm_hf.method.strategies import resolved_knobs
from pm_hf.method.trainer import DivergenceError
from pm_hf.run.checkpoint import saved_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reliability", ROOT / "scripts" / "reliability.py")
rel = importlib.util.module_from_spec(spec)
sys.modules["reliability"] = rel  # its dataclasses look their module up
spec.loader.exec_module(rel)
from reliability_tables.common import run_cli  # noqa: E402 (scripts/ is on the path once reliability.py is loaded)


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing in the library catches it."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rel.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted 3-task run every resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(assets, out)
    return rel.run_outputs(out)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    return rel.finished_run(assets, tmp_path_factory.mktemp("finished") / "run")


def train(assets, out: Path, *flags, **fields) -> tuple[int, str]:
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(rel.base_config(assets, out, **fields)))
    return _cli(["train", "--config", str(config), *flags])


def _cli(argv: list[str]) -> tuple[int, str]:
    code, err = run_cli(argv)
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else ""  # the error line (progress bars of model loading come before it)


@pytest.mark.parametrize("case", rel.BAD_CONFIGS, ids=[c.name for c in rel.BAD_CONFIGS])
def test_a_bad_config_fails_cleanly_before_writing(case, assets, tmp_path):
    ok, detail = rel.run_bad_config(case, assets, tmp_path / "case")
    assert ok, detail
    assert detail.startswith(f"pm-hf: error: {case.expect} = "), detail  # the error names the field to fix


@pytest.mark.parametrize("name", rel.CORRUPTIONS)
def test_a_damaged_checkpoint_is_refused_and_left_alone(name, finished, assets, tmp_path):
    ok, detail = rel.run_corruption(name, finished, assets, tmp_path)
    assert ok, detail
    assert detail.startswith(f"pm-hf: error: {rel.CORRUPTIONS[name]} = "), detail


def _changed_fields(case) -> set[str]:
    """The fields a bad-config case sets, and those its kind of damage belongs to."""
    changed = set(case.fields) | {f[2:] for f in case.flags if f.startswith("--")}
    if any(not f.startswith("-") for f in case.flags[:1]):
        changed.add("arguments")  # a stray positional argument
    raw = case.fields.get("__yaml__")
    if "__yaml__" in case.fields:
        changed |= {"config", *re.findall(r"^(\w+):", raw or "", re.M)}
    changed |= {"output_dir"} if case.out else set()
    changed |= {"model_name_or_path"} if case.model or "model_task" in case.fields else set()  # the model must fit
    changed |= {"data_files", "label_column", "eval_split", "class_groups"} if case.data is not None else set()
    return changed


def test_every_bad_config_case_expects_a_field_it_changes():
    """The field a case's error must name is one the case sets (or the kind of damage it does: a file where the run
    folder goes, a broken model folder, broken data), so a passing row means the error names the real culprit."""
    strays = [
        c.name for c in rel.BAD_CONFIGS if re.sub(r"\[\d+\]$", "", c.expect.lstrip("-")) not in _changed_fields(c)
    ]
    assert not strays, strays
    assert len({c.name for c in rel.BAD_CONFIGS}) == len(rel.BAD_CONFIGS)  # one row per case


def test_a_case_expecting_one_field_fails_when_the_error_names_another(assets, tmp_path):
    mislabelled = rel.BadConfig("seed=-3 expecting learning_rate", {"seed": -3}, expect="learning_rate")
    ok, detail = rel.run_bad_config(mislabelled, assets, tmp_path / "case")
    assert not ok and detail.startswith("names 'seed', not 'learning_rate'"), detail
    ok, detail = rel.run_bad_config(rel.BadConfig("seed=-3", {"seed": -3}, expect="seed"), assets, tmp_path / "ok")
    assert ok and detail.startswith("pm-hf: error: seed = -3: "), detail


LINE = "pm-hf: error: seed = -3: use an integer >= 0."
NOT_REFUSALS = {  # what a command may do instead of the contract's refusal: (exit code or exception, stderr)
    "another field": (2, "pm-hf: error: learning_rate = -3: use a number > 0."),
    "exit 1": (1, LINE),
    "exit 0": (0, ""),
    "SystemExit(1)": (SystemExit(1), LINE),
    "a traceback": (2, f"Traceback (most recent call last):\n  ...\n{LINE}"),
    "no contract line": (2, "pm-hf: error: something went wrong"),
    "two error lines": (2, f"{LINE}\n{LINE}"),
    "an exception": (ValueError("seed"), ""),
}


def _fake_main(monkeypatch, outcome, stderr, write: Path | None = None):
    """`pm-hf` replaced by one that prints `stderr` and exits with `outcome` (or raises it), writing `write` first."""
    import pm_hf.commands.cli as cli

    def main(argv):
        if write is not None:
            write.mkdir(parents=True, exist_ok=True)
            (write / "written.txt").write_text("x")
        print(stderr, file=sys.stderr)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(cli, "main", main)


def test_the_tables_count_only_contract_refusals(assets, finished, tmp_path, monkeypatch):
    """What the tables accept as a refusal: exit 2 with one contract line naming the case's field, nothing written;
    checked on the line parser, then on each table's runner fed every other outcome (bad configs, corruptions), and
    the faults table counts only the fault's own end (SIGKILL, or exit 3 on a full disk)."""
    line = "pm-hf: error: seed = -3: use an integer >= 0."
    assert rel.contract_error(2, f"loading...\n{line}\n", "seed") == (True, line)
    refused = {
        "another field": (2, line, "learning_rate"),
        "exit 1": (1, line, "seed"),
        "exit 0": (0, "", "seed"),
        "a traceback": (2, f"Traceback (most recent call last):\n  ...\n{line}", "seed"),
        "no contract line": (2, "pm-hf: error: something went wrong", "seed"),
        "two error lines": (2, f"{line}\n{line}", "seed"),
    }
    for what, (code, stderr, expect) in refused.items():
        assert not rel.contract_error(code, stderr, expect)[0], what
    with pytest.raises(ValueError, match="expect"):
        rel.BadConfig("a case without its field", {"seed": -3})

    case, name = rel.BadConfig("seed=-3", {"seed": -3}, expect="seed"), "missing pointer"
    with monkeypatch.context() as patch:
        _fake_main(patch, 2, LINE)
        assert rel.run_bad_config(case, assets, tmp_path / "bad-ok") == (True, LINE)
        corruption_line = LINE.replace("seed", "output_dir")
        _fake_main(patch, 2, corruption_line)
        assert rel.run_corruption(name, finished, assets, tmp_path / "corrupt-ok") == (True, corruption_line)
        for i, (what, (outcome, stderr)) in enumerate(NOT_REFUSALS.items()):
            _fake_main(patch, outcome, stderr)
            assert not rel.run_bad_config(case, assets, tmp_path / f"bad{i}")[0], what
            _fake_main(patch, outcome, stderr.replace("seed", "output_dir"))
            assert not rel.run_corruption(name, finished, assets, tmp_path / f"corrupt{i}")[0], what
        _fake_main(patch, 2, LINE, write=tmp_path / "bad-writes" / "out")  # the refusal, after writing the run folder
        ok, detail = rel.run_bad_config(case, assets, tmp_path / "bad-writes")
        assert not ok and detail.startswith("written under"), detail
        _fake_main(patch, 2, corruption_line, write=tmp_path / "corrupt-writes" / "run" / "extra")
        ok, detail = rel.run_corruption(name, finished, assets, tmp_path / "corrupt-writes")
        assert not ok and "changed ['extra/written.txt']" in detail, detail

    kill, crash = -signal.SIGKILL, "Traceback (most recent call last):\n  ...\nRuntimeError: boom"
    assert rel.fault_struck("train", kill, "")[0] and rel.fault_struck("disk", 3, "")[0]
    for point, code in [("train", 0), ("train", 1), ("train", 2), ("train", 3), ("disk", kill), ("disk", 1)]:
        struck, detail = rel.fault_struck(point, code, crash)
        assert not struck and (code == 0 or f"exit {code}" in detail), (point, code, detail)


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_output_dir_that_is_or_sits_under_a_file_is_refused_before_loading(where, tmp_path):
    from pm_hf.commands.parsing import parse_config
    from pm_hf.config.training_args import PMConfig

    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"not a folder")
    out = blocker if where == "file" else blocker / "runs" / "one"
    overrides = ["--output_dir", str(out), "--model_name_or_path", "never-loaded", "--use_cpu", "true"]
    with pytest.raises(InputError, match=r"^output_dir = .*(is a file, not a folder|is a file, so no folder)"):
        parse_config(None, overrides)  # the config alone: no model or data is looked at
    with pytest.raises(InputError, match="^output_dir = "):
        PMConfig(output_dir=str(out), use_cpu=True)  # the Python API refuses it too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_bytes() == b"not a folder"
    PMConfig(output_dir=str(tmp_path / "new" / "run"), use_cpu=True)  # a folder that does not exist yet is fine
    assert not (tmp_path / "new").exists()


IN_PROCESS_FAULTS = [f for f in rel.FAULTS if f[1] in ("checkpoint", "pointer", "results", "record", "disk", "train")]
DEFAULT_FAULTS = ("training, task 2", "checkpoint write, task 1")  # the rest of the sweep: slow tier (CI runs it)


@pytest.mark.parametrize(
    "name, point, nth",
    [f if f[0] in DEFAULT_FAULTS else pytest.param(*f, marks=pytest.mark.slow) for f in IN_PROCESS_FAULTS],
    ids=[f[0] for f in IN_PROCESS_FAULTS],
)
def test_a_run_stopped_at_any_step_resumes_to_identical_results(name, point, nth, assets, reference, tmp_path):
    out = tmp_path / "run"

    def die():
        raise Killed(name)

    with rel.fault_points_restored(), pytest.raises(OSError if point == "disk" else Killed):
        rel.install_fault(point, nth, die)
        train(assets, out)
    assert train(assets, out, "--resume")[0] == 0
    ok, detail = rel.compare_with_reference(out, reference)
    assert ok, detail
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the killed run's temporaries were removed


def _stopped_run(assets, out: Path) -> dict:
    """A 3-task run stopped after 2 tasks; returns the bytes of its files."""
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    config = out.parent / "stopped.yaml"
    config.write_text(yaml.safe_dump(rel.base_config(assets, out)))
    with contextlib.redirect_stdout(io.StringIO()):
        run_continual(*parse_config(config), stop_after=2)
    return rel._snapshot(out)


def test_resume_refuses_another_config_or_other_data_and_allows_paths(assets, reference, tmp_path, monkeypatch):
    """`train --resume` and `check --resume` refuse every change once the data is read, before the model is loaded
    and with nothing written; paths and fields that change nothing resume the same run."""
    out = tmp_path / "run"
    before = _stopped_run(assets, out)
    loads = []
    real = AutoModelForSequenceClassification.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))  # fmt: skip
    other_model = rel.make_assets(tmp_path / "other")["model"]  # same shape, other weights (another vocabulary)
    changed_data = tmp_path / "changed"
    shutil.copytree(Path(assets["files"]["train"]).parent, changed_data, ignore=shutil.ignore_patterns("model"))
    frame = pd.read_parquet(changed_data / "train.parquet")
    frame.loc[frame.index[0], "text"] = "an edited gloss"
    frame.to_parquet(changed_data / "train.parquet")
    saved_groups = rel.base_config(assets, out)["class_groups"]
    reordered, regrouped = [[1, 0], [3, 2], [4, 5]], [[0, 2], [1, 3], [4, 5]]  # classes in another order; other tasks
    changes = [  # (what the refusal must name, the changed fields)
        ("seed", {"seed": 1}),
        (f"class_groups: {saved_groups!r} -> {reordered!r}", {"class_groups": reordered}),
        (f"class_groups: {saved_groups!r} -> {regrouped!r}", {"class_groups": regrouped}),
        ("learning_rate", {"learning_rate": 0.01}),
        ("merge_method", {"merge_method": "average"}),
        ("r", {"r": 4}),
        ("perturb_eps", {"perturb_eps": 0.25}),
        ("global batch", {"per_device_train_batch_size": 2}),
        ("model", {"model_name_or_path": other_model}),
        ("data of tasks", {
            "data_files": {"train": str(changed_data / "train.parquet"), "test": assets["files"]["test"]}
        }),
    ]  # fmt: skip
    for what, fields in changes:
        code, err = train(assets, out, "--resume", **fields)
        assert code == 2 and err.startswith("pm-hf: error: resume = ") and what in err, (what, err)
        assert rel._snapshot(out) == before, what  # nothing written
        config = tmp_path / "check.yaml"
        config.write_text(yaml.safe_dump(rel.base_config(assets, out, **fields)))
        code, err = _cli(["check", str(config), "--resume"])
        assert code == 2 and err.startswith("pm-hf: error: resume = ") and what in err, (what, err)
    assert not loads and rel._snapshot(out) == before
    # the same global batch split differently resumes (floats within rounding of the uninterrupted run)
    split = tmp_path / "split"
    shutil.copytree(out, split)
    code, _ = train(assets, split, "--resume", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert code == 0
    alphas = json.loads((split / "results.json").read_text())["alphas"]
    assert alphas == pytest.approx(reference["results"]["alphas"], abs=1e-6)
    # fields that change nothing resume the same run, bit for bit
    code, _ = train(assets, out, "--resume", logging_steps=1, per_device_eval_batch_size=3, disable_tqdm=False)
    assert code == 0
    ok, detail = rel.compare_with_reference(out, reference)
    assert ok, detail


def test_the_run_record_keeps_the_merge_knobs_as_resolved(finished):
    """The run record keeps the strategy's declared knobs as resolved, defaults included (`merge_knobs`: what a
    resume compares, tests/test_run_record.py)."""
    saved = saved_config(finished)
    assert saved["merge_knobs"] == resolved_knobs(MergeArguments(**{
        k: v for k, v in saved["MergeArguments"].items() if k in MergeArguments.__dataclass_fields__}))  # fmt: skip
    assert saved["pm_hf"] == pm_hf.__version__


@pytest.mark.parametrize("saved", ["0.0.1", None])
def test_a_resume_by_another_pm_hf_says_so(saved, assets, finished, tmp_path, caplog):
    """A record of another version, or of one that recorded none, resumed: a warning names both; the checkpoints
    written from then on name this version."""
    run = tmp_path / "run"
    _copy_with_record(finished, run, lambda config: config.update(pm_hf=saved) if saved else config.pop("pm_hf"))
    with caplog.at_level("WARNING", logger="pm_hf.run.loop"):
        code, _ = train(assets, run, "--resume")
    was = saved or "of a version it did not record"
    assert code == 0 and f"was saved by pm_hf {was}, resumed by {pm_hf.__version__}" in caplog.text
    assert saved_config(run)["pm_hf"] == pm_hf.__version__  # (the finished fixture stops a task early)


def test_a_finished_or_foreign_folder_is_not_overwritten(assets, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = rel._snapshot(run)
    code, err = train(assets, run)
    assert code == 2 and "holds a pm_hf run: pass --resume" in err and rel._snapshot(run) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = train(assets, foreign)
    assert code == 2 and "holds no pm_hf run" in err and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    code, err = train(assets, foreign, "--resume")  # nothing to continue there: never trained among its files
    assert code == 2 and "holds no pm_hf run to resume" in err and [p.name for p in foreign.iterdir()] == ["notes.txt"]
    code, err = train(assets, foreign, "--overwrite_output_dir", "true")  # it replaces a run's files, no others
    assert code == 2 and "holds no pm_hf run to replace" in err and [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (run / ".checkpoint-task3.tmp-4242").mkdir()  # left by a killed run
    code, _ = train(assets, run, "--overwrite_output_dir", "true", class_groups=[[0, 1], [2, 3]])
    assert code == 0 and not (run / ".checkpoint-task3.tmp-4242").exists()
    assert json.loads((run / "latest.json").read_text())["completed"] == 2


class PoisonAt(TrainerCallback):
    """Puts NaN into the LoRA factors at one step of one task: the next loss is NaN."""

    def __init__(self, task: int):
        self.task, self.trainers = task, 0

    def on_train_begin(self, args, state, control, **kw):
        self.trainers += 1

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.trainers == self.task + 1 and state.global_step == 1:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(float("nan"))


def test_divergence_stops_the_run_and_keeps_the_last_checkpoint(assets, reference, tmp_path):
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    code, err = train(assets, tmp_path / "lr", merge_method="seq-merge", learning_rate=1e30)
    assert code == 1 and "training diverged in task 0" in err and "Traceback" not in err
    assert not (tmp_path / "lr" / "latest.json").exists()
    (tmp_path / "lr" / "runs").mkdir()  # TensorBoard's logs, where report_to asks for them
    (tmp_path / "lr" / "runs" / "events.out.tfevents.1").write_bytes(b"logs")
    (tmp_path / "foreign" / "runs").mkdir(parents=True)  # a runs/ of other files is not a run's logs
    (tmp_path / "foreign" / "runs" / "notes.txt").write_text("mine")
    code, err = train(assets, tmp_path / "foreign", merge_method="seq-merge", class_groups=[[0, 1]])
    assert code == 2 and "holds no pm_hf run" in err
    code, _ = train(assets, tmp_path / "lr", merge_method="seq-merge", class_groups=[[0, 1]])  # the rerun it asks for
    assert code == 0 and json.loads((tmp_path / "lr" / "latest.json").read_text())["completed"] == 1
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(rel.base_config(assets, out)))
    with pytest.raises(DivergenceError, match="task 1 at optimizer step 2: loss = nan"):
        run_continual(*parse_config(config), callbacks=[PoisonAt(1)])
    assert json.loads((out / "latest.json").read_text())["completed"] == 1  # task 0's checkpoint, untouched
    assert train(assets, out, "--resume")[0] == 0
    ok, detail = rel.compare_with_reference(out, reference)
    assert ok, detail


def test_an_exploding_loss_is_divergence_too(tmp_path):
    from types import SimpleNamespace

    from pm_hf.method.trainer import PMTrainer

    trainer = SimpleNamespace(_first_loss=None, task_index=2, state=SimpleNamespace(global_step=6),
                              args=SimpleNamespace(divergence_threshold=1000.0))  # fmt: skip
    check = lambda value: PMTrainer._check_loss(trainer, value)  # noqa: E731
    check(0.001)  # a task that starts almost solved: the limit is 1000 x max(1, first loss)
    check(999.0)
    with pytest.raises(DivergenceError, match="task 2 at optimizer step 7: loss = 1001"):
        check(1001.0)
    with pytest.raises(DivergenceError, match="loss = inf"):
        check(float("inf"))
    trainer.args.divergence_threshold = None
    check(1e12)  # only non-finite losses stop it then


def test_non_finite_state_is_never_written(assets, tmp_path, monkeypatch):
    import pm_hf.run.task_passes as passes

    real = passes.estimate_fisher

    def nan_fisher(*args, **kwargs):
        fisher = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in fisher.items()}

    monkeypatch.setattr(passes, "estimate_fisher", nan_fisher)
    code, err = train(assets, tmp_path / "run")
    assert code == 1 and "the Fisher of task 0" in err and "NaN/inf" in err
    assert not (tmp_path / "run" / "latest.json").exists() and not (tmp_path / "run" / "adapters").exists()


def _copy_with_record(finished: Path, run: Path, edit) -> None:
    """A copy of the finished run whose saved run record `edit(config)` changed (its manifest made to match)."""
    from pm_hf.fileio import file_digest

    shutil.copytree(finished, run)
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    meta = json.loads((ckpt / "state.json").read_text())
    edit(meta["config"])
    (ckpt / "state.json").write_text(json.dumps(meta))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = file_digest([ckpt / "state.json"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_evaluate_never_acts_on_hub_or_tracker_settings_and_rewrites_stale_results(finished, tmp_path):
    run = tmp_path / "run"
    hub = {"push_to_hub": True, "hub_model_id": "someone/repo", "report_to": ["tensorboard"]}
    _copy_with_record(finished, run, lambda config: config["PMConfig"].update(hub) or config.update(pm_hf="0.0.1"))
    results = json.loads((run / "results.json").read_text())
    stale = {**results, "accuracy_matrix": results["accuracy_matrix"][:1]}  # a kill left it one task behind
    (run / "results.json").write_text(json.dumps(stale))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", str(run)]) == 0  # offline: any Hub call would fail
    assert not list(run.rglob("events.out.tfevents*"))
    rewritten = json.loads((run / "results.json").read_text())
    assert rewritten["accuracy_matrix"] == results["accuracy_matrix"]
    assert rewritten["config"]["pm_hf"] == "0.0.1"  # the version that trained it, not the one evaluating


def test_input_errors_are_input_errors():
    from pm_hf.config.checks import invalid

    assert isinstance(invalid("x", 1, "fix"), InputError) and str(invalid("x", 1, "use 2.")) == "x = 1: use 2."
