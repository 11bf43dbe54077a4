"""Runs that can be trusted (the tables of scripts/reliability.py, in-process): every bad config fails cleanly before
anything is written, a damaged checkpoint is refused, a run stopped at any step resumes to identical results, a
resume with another config or other data is refused, divergence stops the run with its last checkpoint intact, and
the run folder belongs to one run."""

import contextlib
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from pm_hf.commands.cli import main
from pm_hf.config.checks import InputError
from pm_hf.method.trainer import DivergenceError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reliability", ROOT / "scripts" / "reliability.py")
rel = importlib.util.module_from_spec(spec)
sys.modules["reliability"] = rel  # its dataclasses look their module up
spec.loader.exec_module(rel)


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
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--config", str(config), *flags])
    except SystemExit as exit_:
        code = exit_.code
    lines = err.getvalue().strip().splitlines()
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


def test_the_tables_count_only_contract_refusals():
    """What the tables accept as a refusal: exit 2 with one contract line naming the case's field, nothing else."""
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

    with rel.fault_points_restored(), pytest.raises((Killed, OSError)):
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


def test_resume_refuses_another_config_or_other_data_and_allows_paths(assets, reference, tmp_path):
    out = tmp_path / "run"
    before = _stopped_run(assets, out)
    other_model = rel.make_assets(tmp_path / "other")["model"]  # same shape, other weights (another vocabulary)
    changed_data = tmp_path / "changed"
    shutil.copytree(Path(assets["files"]["train"]).parent, changed_data, ignore=shutil.ignore_patterns("model"))
    frame = rel.pd.read_parquet(changed_data / "train.parquet")
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
    import pm_hf.run.loop as continual

    real = continual.estimate_fisher

    def nan_fisher(*args, **kwargs):
        fisher = real(*args, **kwargs)
        return {k: v * float("nan") for k, v in fisher.items()}

    monkeypatch.setattr(continual, "estimate_fisher", nan_fisher)
    code, err = train(assets, tmp_path / "run")
    assert code == 1 and "the Fisher of task 0" in err and "NaN/inf" in err
    assert not (tmp_path / "run" / "latest.json").exists() and not (tmp_path / "run" / "adapters").exists()


def test_evaluate_never_acts_on_hub_or_tracker_settings_and_rewrites_stale_results(finished, tmp_path):
    from pm_hf.fileio import file_digest

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    meta = json.loads((ckpt / "state.json").read_text())
    meta["config"]["PMConfig"].update(push_to_hub=True, hub_model_id="someone/repo", report_to=["tensorboard"])
    (ckpt / "state.json").write_text(json.dumps(meta))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"]["state.json"] = file_digest([ckpt / "state.json"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    results = json.loads((run / "results.json").read_text())
    stale = {**results, "accuracy_matrix": results["accuracy_matrix"][:1]}  # a kill left it one task behind
    (run / "results.json").write_text(json.dumps(stale))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", str(run)]) == 0  # offline: any Hub call would fail
    assert not list(run.rglob("events.out.tfevents*"))
    assert json.loads((run / "results.json").read_text())["accuracy_matrix"] == results["accuracy_matrix"]


def test_input_errors_are_input_errors():
    from pm_hf.config.checks import invalid

    assert isinstance(invalid("x", 1, "fix"), InputError) and str(invalid("x", 1, "use 2.")) == "x = 1: use 2."
