"""Bad input at every door (`scripts/reliability_tables/doors.py`): `pm-hf evaluate | export | push | merge | check`
exit 2 with one line `pm-hf: error: <field> = ...` naming the case's field, no traceback, nothing created or changed
on disk or on the Hub stand-in; the API raises `InputError` naming the Python argument. The quick sample (no run
trained, no adapters made) runs in the default tier, the whole table in the slow one. Then what the table's rows
cannot show: a refused push asked the Hub nothing, an API error comes before the model is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from pm_hf import ContinualTrainer, PMConfig
from pm_hf.config.checks import InputError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from reliability_tables import TABLES, door_inputs, doors  # noqa: E402
from reliability_tables.common import contract_error  # noqa: E402


def _failures(rows) -> list:
    return [f"{door}: {case}: {detail}" for door, case, ok, detail in rows if not ok]


def test_the_quick_sample_of_every_door_is_refused_cleanly(tmp_path):
    rows = doors.rows(tmp_path, quick=True)
    assert {door for door, *_ in rows} == {"evaluate", "export", "push", "merge", "check", "api"}
    assert len(rows) == sum(case.quick for case in doors.CASES) >= 15
    assert not _failures(rows)
    assert "doors" in TABLES


@pytest.mark.slow
def test_every_door_refuses_every_bad_input_cleanly(tmp_path):
    rows = doors.rows(tmp_path, quick=False)
    assert len(rows) == len(doors.CASES) and not _failures(rows)


def test_a_case_that_writes_or_names_another_field_fails(tmp_path, monkeypatch):
    """The table can fail: an error naming another field, and a refusal that wrote a file, are not ok."""
    ctx = door_inputs.Context(tmp_path)
    wrong = doors.Case("export", "wrong field", "mode", "export {f}/nowhere --output {f}/x")
    ok, detail = doors.run_case(wrong, ctx, tmp_path / "a")
    assert not ok and "names 'run_dir', not 'mode'" in detail

    def refuses_after_writing(argv):
        (tmp_path / "b" / "stray").write_text("written before the refusal")
        return 2, "pm-hf: error: run_dir = 'x': not found.\n"

    monkeypatch.setattr(doors, "_command", refuses_after_writing)
    ok, detail = doors.run_case(doors.Case("export", "writes", "run_dir", "export"), ctx, tmp_path / "b")
    assert not ok and "but changed ['b/stray']" in detail


def test_an_api_error_comes_before_the_model_is_loaded(tmp_path, monkeypatch):
    """A bad later task, and an output folder of other files: refused before `from_pretrained`, nothing written."""
    ctx = door_inputs.Context(tmp_path / "ctx")
    loads = []
    real = AutoModelForSequenceClassification.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", classmethod(counted))
    args = PMConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    first = doors._tasks(ctx)[0]
    with pytest.raises(InputError, match=r"^tasks\[1\] = 'set'"):
        ContinualTrainer(ctx.assets["model"], args, tasks=[first, {1, 2}]).train()
    untrained = doors._tasks(ctx, [0, 1], [2, 3, 4], drop_train=4)
    with pytest.raises(InputError, match=r"^tasks\[1\] = .*eval split holds classes \[4\]"):
        ContinualTrainer(ctx.assets["model"], args, tasks=untrained).train()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    other = PMConfig(output_dir=str(tmp_path / "photos"), use_cpu=True, report_to=[])
    with pytest.raises(InputError, match=r"^args\.output_dir = .*holds no pm_hf run"):
        ContinualTrainer(ctx.assets["model"], other, tasks=[first]).train()
    assert not loads and not (tmp_path / "out").exists()
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_a_refused_push_asks_the_hub_nothing(tmp_path):
    """A missing run folder, a bad repository id or branch: refused before the token is even shown to the Hub."""
    (tmp_path / "run").mkdir()
    repo = ["--hub_model_id", "me/model", "--hub_token", "TOKEN"]
    with doors._hub_standin(tmp_path / "cache") as hub:
        refused = [
            doors._command(["push", str(tmp_path / "nowhere"), *repo]),
            doors._command(["push", str(tmp_path / "run"), *repo]),
            doors._command(["push", str(tmp_path / "run"), "--hub_model_id", "me/a b", "--hub_token", "TOKEN"]),
            doors._command(["push", str(tmp_path / "run"), *repo, "--revision", "a..b"]),
        ]
    fields = [err.split(" = ")[0].removeprefix("pm-hf: error: ") for _, err in refused]
    assert [code for code, _ in refused] == [2] * 4 and fields == ["run_dir", "run_dir", "hub_model_id", "revision"]
    assert hub.calls == [] and hub.repos == {}


def test_a_refused_task_list_is_kept_whole(tmp_path):
    """A refused task leaves the trainer's tasks as given: the same error again, no loop, no folder."""
    ctx = door_inputs.Context(tmp_path / "ctx")
    args = PMConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    first, second = doors._tasks(ctx)
    trainer = ContinualTrainer(ctx.assets["model"], args, tasks=[first, {"test": second["test"]}])
    for _ in range(2):  # the same error again: nothing of the list was dropped
        with pytest.raises(InputError, match=r"^tasks\[1\] = \{'test': \d+\}: has no 'train' split"):
            trainer.evaluate()
    assert trainer.loop is None and not (tmp_path / "out").exists()


def test_the_python_functions_behind_export_and_push_check_first(tmp_path):
    """`export_run_dir` and `push_run_dir` take the commands' checks: nothing written, the Hub asked nothing."""
    from pm_hf.run.runs import export_run_dir, push_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with doors._hub_standin(tmp_path / "cache") as hub:
        for call, field in [
            (lambda: push_run_dir(tmp_path / "run", "me/model", token="TOKEN"), "run_dir"),
            (lambda: push_run_dir(tmp_path / "run", "me/a b", token="TOKEN"), "hub_model_id"),
            (lambda: push_run_dir(tmp_path / "run", "me/model", revision="a..b", token="TOKEN"), "revision"),
            (lambda: export_run_dir(tmp_path / "run", tmp_path / "out"), "run_dir"),
            (lambda: export_run_dir(tmp_path / "run", tmp_path / "out", mode="bad"), "mode"),
        ]:
            with pytest.raises(InputError, match=rf"^{field} = "):
                call()
    assert hub.calls == [] and hub.repos == {}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["notes.txt", "run"]
    assert list((tmp_path / "run").iterdir()) == []


def test_a_merge_config_that_does_not_fit_the_adapters_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    """`pm-hf merge --config`: heads of another size than the config's classes, and more tasks than adapters, are
    refused once the data is read, before any model weights are loaded, with nothing written."""
    ctx = door_inputs.Context(tmp_path / "ctx")
    adapters = ctx.adapters  # made before counting: two 2-class heads (a, b) and a 4-class one (wide)
    loads = []
    real = AutoModelForSequenceClassification.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or real(cls, *a, **k)))  # fmt: skip
    config = ctx.config(tmp_path, class_groups=[[0, 1, 2], [3, 4, 5]])  # two tasks: a head of 6 classes
    cases = [(["--adapters", adapters["a"], adapters["b"]], "classifier.weight", "the adapters' shape"),
             (["--adapters", adapters["wide"]], "adapters", "the config has 2 tasks for 1 adapters")]  # fmt: skip
    for argv, field, says in cases:
        code, err = doors._command(["merge", *argv, "--config", config, "--output", str(tmp_path / "m" / "merged")])
        ok, line = contract_error(code, err, field)
        assert ok and says in line, line
    assert not loads and not (tmp_path / "m").exists() and not (tmp_path / "out").exists()
