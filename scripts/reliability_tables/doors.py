"""Bad input at every door but `train` (whose configs are the bad-configs table): `pm-hf evaluate | export | push |
merge | check` and the Python API (`ContinualTrainer`). A command's case passes when it exits 2 with one line
`pm-hf: error: <field> = <value>: <fix>` naming the field the case expects, no traceback, and nothing under the
table's folder is created or changed (the case's own folder, the shared run and adapters), nor anything created on
the Hub stand-in (`tests/hub_standin.py`); an API case when it raises `InputError` naming the Python argument, with
nothing written. The inputs are those a new user gets wrong: a run folder that is missing, a file, empty, someone
else's or killed before its first checkpoint; an export or merge destination that is a file or holds other files; a
repository id or branch the Hub refuses; adapters that are missing, broken or trained otherwise; a test class never
trained; one task, or one task's rows, where the list of tasks goes."""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .common import ROOT, _tree, contract_error, hub_client
from .door_inputs import TWO_TASKS, Context, Inputs, _write

KIND = "bad inputs"
TITLE = "bad input at evaluate, export, push, merge, check and the API: refused by the contract, nothing written"


@dataclass
class Case:
    door: str
    name: str
    expect: str  # the field the error line names (the API: the Python argument)
    make: str | Callable  # a command: its arguments, `{name}` an input of `Inputs`; the API: (ctx, folder) -> thunk
    quick: bool = False  # in the default test tier's sample (no run trained, no adapters made)


# ------------------------------------------------------------------------------------------------ the commands' cases
RUN_FOLDERS = {"missing": "{f}/nowhere", "a file": "{file}", "an empty folder": "{empty}",
               "a folder of photos": "{photos}", "killed before its first checkpoint": "{killed}",
               "latest.json unreadable": "{broken}"}  # fmt: skip
PUSH = "--hub_model_id me/model --hub_token TOKEN"
ADAPTERS = "--adapters {a} {b} --merge_method ties"
CONFIG = "{config:class_groups=[[0, 1], [2, 3]]}"

# fmt: off
COMMANDS = [
    *[Case("evaluate", f"run_dir {what}", "run_dir", f"evaluate {path}", what != "a folder of photos")
      for what, path in RUN_FOLDERS.items()],
    Case("evaluate", "an option without --config", "options", "evaluate {f} --task 5", True),
    Case("evaluate", "--config missing", "config", "evaluate {exp} --config {f}/no.yaml", True),
    Case("evaluate", "not an export, with --config", "model", "evaluate {exp} --config {config}"),
    Case("evaluate", "an unknown data field", "--max_lenght", "evaluate {exp} --config {config} --max_lenght 8"),

    *[Case("export", f"run_dir {what}", "run_dir", f"export {path} --output {{f}}/export", what == "missing")
      for what, path in RUN_FOLDERS.items()],
    Case("export", "no --output", "output", "export {f}", True),
    Case("export", "a --task option", "--task", "export {f} --task 1 --output {f}/export", True),
    Case("export", "an unknown mode", "mode", "export {f} --mode lora --output {f}/export", True),
    Case("export", "adapter-svd without --rank", "rank", "export {run} --mode adapter-svd --output {f}/export"),
    Case("export", "--rank 0", "rank", "export {run} --mode adapter-svd --rank 0 --output {f}/export"),
    Case("export", "--rank with mode adapter", "rank", "export {run} --rank 4 --output {f}/export"),
    Case("export", "per-task of a classifier run", "mode", "export {run} --mode per-task --output {f}/export"),
    Case("export", "--output the run folder", "output", "export {run} --output {run}"),
    Case("export", "--output a file", "output", "export {run} --output {file}"),
    Case("export", "--output under a file", "output", "export {run} --output {file}/export"),
    Case("export", "--output a folder of photos", "output", "export {run} --output {photos}"),

    *[Case("push", f"run_dir {what}", "run_dir", f"push {path} {PUSH}", what == "missing")
      for what, path in RUN_FOLDERS.items()],
    Case("push", "no --hub_model_id", "hub_model_id", "push {f}", True),
    Case("push", "a misspelt option", "--privat", f"push {{f}} {PUSH} --privat", True),
    *[Case("push", f"hub_model_id {bad}", "hub_model_id", f"push {{f}} --hub_model_id {bad} --hub_token TOKEN", True)
      for bad in ("'me/model name'", "me/a/b", "me/", "me/--model", "me/" + "x" * 97)],
    Case("push", "--revision not a branch name", "revision", f"push {{f}} {PUSH} --revision bad..name", True),
    Case("push", "a read-only token", "hub_token", "push {run} --hub_model_id me/model --hub_token READ"),
    Case("push", "an unknown token", "hub_token", "push {run} --hub_model_id me/model --hub_token hf_nobody"),
    Case("push", "another user's namespace", "hub_model_id", "push {run} --hub_model_id someone/m --hub_token TOKEN"),

    Case("merge", "an adapter missing", "adapters", "merge --adapters {f}/a {f}/b --output {f}/merged", True),
    Case("merge", "an adapter a file", "adapters", "merge --adapters {file} {file} --output {f}/merged", True),
    Case("merge", "no --output", "output", "merge --adapters {f}", True),
    Case("merge", "no --adapters", "adapters", "merge --output {f}/merged", True),
    Case("merge", "an adapter a folder of photos", "adapters", "merge --adapters {a} {photos} --output {f}/m"),
    Case("merge", "adapter weights unreadable", "adapters", "merge --adapters {a} {bad_weights} --output {f}/m"),
    Case("merge", "another base", "base_model_name_or_path", "merge --adapters {a} {other_base} --output {f}/m"),
    Case("merge", "other target modules", "target_modules", "merge --adapters {a} {query_only} --output {f}/m"),
    Case("merge", "another rank", "r", "merge --adapters {a} {r4} --output {f}/m"),
    Case("merge", "a head of another size", "classifier.weight", "merge --adapters {a} {wide} --output {f}/m"),
    Case("merge", "an unknown merge_method", "merge_method", "merge --adapters {a} {b} --merge_method tie --output m"),
    Case("merge", "a method that needs data", "merge_method", "merge --adapters {a} {b} --merge_method pm --output m"),
    Case("merge", "merge_scale nan", "merge_scale", f"merge {ADAPTERS} --merge_scale nan --output {{f}}/m"),
    Case("merge", "merge_scale not a number", "merge_scale", f"merge {ADAPTERS} --merge_scale big --output {{f}}/m"),
    Case("merge", "an unknown option", "--scale", f"merge {ADAPTERS} --scale 2 --output {{f}}/m"),
    Case("merge", "--output a file", "output", f"merge {ADAPTERS} --output {{file}}"),
    Case("merge", "--output a folder of photos", "output", f"merge {ADAPTERS} --output {{photos}}"),
    Case("merge", "--output one of the adapters", "output", "merge --adapters {a} {b_copy} --output {b_copy}"),
    Case("merge", "--config: heads of another size", "classifier.weight",
         f"merge --adapters {{a}} {{b}} --config {CONFIG} --output {{f}}/new/merged"),
    Case("merge", "--config: more tasks than adapters", "adapters",
         f"merge --adapters {{wide}} --config {CONFIG} --output {{f}}/m"),
    Case("merge", "--config: another model", "model_name_or_path",
         f"merge {ADAPTERS} --config {{config:model_name_or_path={ROOT}/data/tiny-bert}} --output {{f}}/m"),

    Case("check", "no config", "config", "check", True),
    Case("check", "config missing", "config", "check {f}/no.yaml", True),
    Case("check", "config not YAML", "config", "check {broken}/latest.json", True),
    Case("check", "output_dir a file", "output_dir", "check {config} --output_dir {file}"),
    Case("check", "output_dir of photos", "output_dir", "check {config} --output_dir {photos}"),
    Case("check", "model missing", "model_name_or_path", "check {config:model_name_or_path=/nowhere/model}"),
    Case("check", "class_groups with a class not in the data", "class_groups",
         "check {config:class_groups=[[0, 1], [7]]}"),
    Case("check", "a test class never trained", "eval_split", "check {untrained_test}"),
    Case("check", "a data file missing", "data_files", "check {missing_data}"),
    Case("check", "text_column absent", "text_column", "check {config:text_column=sentence}"),
]
# fmt: on


# ------------------------------------------------------------------------------------------------ the API's cases
def _api(tasks=None, model=None, args=None, **kw) -> Callable:
    """(ctx, folder) -> a thunk building and training a `ContinualTrainer` on the assets: `tasks(ctx)` (default two
    tasks), `args(folder)` (default a PMConfig of the fields in `kw`, `merge_args`/`data_args` among them)."""

    def make(ctx: Context, folder: Path) -> Callable:
        from pm_hf import ContinualTrainer, PMConfig
        from pm_hf.config.groups import FisherArguments, LoraArguments

        groups = {k: kw[k] for k in ("merge_args", "data_args") if k in kw}
        fields = {k: v(folder) if callable(v) else v for k, v in kw.items() if k not in groups}
        defaults = {"output_dir": str(folder / "out"), "num_train_epochs": 1, "report_to": [], "use_cpu": True,
                    "per_device_train_batch_size": 8, "disable_tqdm": True}  # fmt: skip

        def go():
            given = args(folder) if args else PMConfig(**{**defaults, **fields})
            trainer = ContinualTrainer(model=ctx.assets["model"] if model is None else model, args=given,
                                       tasks=_tasks(ctx) if tasks is None else tasks(ctx),
                                       lora_args=LoraArguments(r=2), fisher_args=FisherArguments(fisher_max_samples=8),
                                       **groups)  # fmt: skip
            trainer.train()

        return go

    return make


def _tasks(ctx: Context, *groups: list[int], drop_train: int | None = None) -> list[dict]:
    """Tasks of the assets' classes `groups` (default two), each a dict of train/test Datasets; `drop_train`: a class
    left out of the training splits only."""
    import datasets
    import pandas as pd

    frames = {s: pd.read_parquet(ctx.assets["files"][s])[["text", "label"]] for s in ("train", "test")}
    out = []
    for classes in groups or TWO_TASKS:
        task = {}
        for split, frame in frames.items():
            keep = frame.label.isin(classes) & ~((frame.label == drop_train) & (split == "train"))
            task[split] = datasets.Dataset.from_pandas(frame[keep], preserve_index=False)
        out.append(task)
    return out


def _named(ctx: Context) -> list[dict]:
    """The first task with its labels written as names ('0', '1'), not class ids."""
    from datasets import Value

    return [{split: ds.cast_column("label", Value("string")) for split, ds in _tasks(ctx)[0].items()}]


def _training_arguments(**kw) -> Callable:
    from transformers import TrainingArguments

    return lambda folder: TrainingArguments(output_dir=str(folder / "out"), use_cpu=True, report_to=[], **kw)


def _photos(folder: Path) -> str:
    return _write(folder / "photos" / "cat.jpg", b"\xff\xd8") and str(folder / "photos")


def _api_cases() -> list[Case]:
    from pm_hf.config.groups import DataArguments, MergeArguments

    rows = lambda ctx: [dict(row) for row in _tasks(ctx)[0]["train"]]  # noqa: E731
    # fmt: off
    return [
        Case("api", "args a dict", "args", _api(args=lambda folder: {"output_dir": str(folder)}), True),
        Case("api", "model a number", "model", _api(model=42), True),
        Case("api", "an unknown merge_method", "merge_args.merge_method",
             _api(merge_args=MergeArguments(merge_method="tie")), True),
        Case("api", "tasks a flat list of rows", "tasks", _api(tasks=rows), True),
        Case("api", "tasks one task", "tasks", _api(tasks=lambda ctx: _tasks(ctx)[0]), True),
        Case("api", "no tasks", "tasks", _api(tasks=lambda ctx: []), True),
        Case("api", "a task a set", "tasks[1]", _api(tasks=lambda ctx: [_tasks(ctx)[0], {1, 2}]), True),
        Case("api", "a test class absent from training", "tasks[1]",
             _api(tasks=lambda ctx: _tasks(ctx, [0, 1], [2, 3, 4], drop_train=4)), True),
        Case("api", "the first task's test class absent", "tasks[0]",
             _api(tasks=lambda ctx: _tasks(ctx, [0, 1, 2], drop_train=2))),
        Case("api", "text_column absent", "data_args.text_column",
             _api(data_args=DataArguments(text_column="txt")), True),
        Case("api", "labels as strings", "data_args.label_column", _api(tasks=_named), True),
        Case("api", "TrainingArguments with a hub_strategy of its own", "args.hub_strategy",
             _api(args=_training_arguments(hub_strategy="checkpoint"))),
        Case("api", "output_dir a file", "output_dir", _api(output_dir=lambda folder: _write(folder / "thing"))),
        Case("api", "output_dir of photos", "args.output_dir", _api(output_dir=_photos), True),
        Case("api", "resume_from nowhere", "args.resume_from",
             _api(resume_from=lambda folder: str(folder / "nowhere")), True),
    ]
    # fmt: on


CASES = [*COMMANDS, *_api_cases()]


# ------------------------------------------------------------------------------------------------ running a case
@contextlib.contextmanager
def _hub_standin(folder: Path):
    """The Hub stand-in in place of the client (no login here: only --hub_token counts); 'TOKEN' writes, 'READ'
    reads."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import hub_standin

    finally:
        sys.path.remove(str(ROOT / "tests"))
    with hub_client(hub_standin.FakeHub(tokens=("TOKEN",), read_tokens=("READ",), cache_dir=folder)) as fake:
        yield fake


def _command(argv: list[str]) -> tuple[int, str]:
    from pm_hf.commands.cli import main

    stderr, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:  # noqa: BLE001 - a traceback is what the case reports
        return 1, f"Traceback: raised {type(err).__name__}: {str(err)[:200]}"
    return code, stderr.getvalue()


def _api_error(thunk: Callable, expect: str) -> tuple[bool, str]:
    from pm_hf.errors import InputError

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            thunk()
    except InputError as err:
        field = str(err).partition(" = ")[0]
        return (field == expect), (str(err) if field == expect else f"names {field!r}, not {expect!r}: {err}")
    except Exception as err:  # noqa: BLE001 - what the case reports
        return False, f"raised {type(err).__name__}: {str(err)[:200]}"
    return False, "accepted"


HUB_WRITES = ("create_repo", "create_branch", "create_commit", "create_tag", "delete_tag")


def run_case(case: Case, ctx: Context, folder: Path) -> tuple[bool, str]:
    """One case: (passed, the error line or what went wrong instead)."""
    folder.mkdir(parents=True)
    with _hub_standin(ctx.work / "hub_cache") as hub:
        if case.door == "api":
            made = case.make(ctx, folder)
        else:
            made = shlex.split(case.make.format_map(Inputs(ctx, folder)))  # the inputs made before the snapshot
        before = _tree(ctx.work)
        if case.door == "api":
            ok, detail = _api_error(made, case.expect)
        else:
            ok, detail = contract_error(*_command(made), case.expect)
        writes = [call for call in hub.calls if call[0] in HUB_WRITES]
    if not ok:
        return False, detail
    changed = _changes(before, _tree(ctx.work))
    if changed:
        return False, f"{detail}; but changed {changed[:3]}"
    if writes:
        return False, f"{detail}; but wrote to the Hub: {writes[:2]}"
    return True, detail


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k, 0) != after.get(k, 0))


def rows(work: Path, quick: bool, verbose: bool = False) -> list[tuple[str, str, bool, str]]:
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(work)
    out = []
    for i, case in enumerate(c for c in CASES if c.quick or not quick):
        ok, detail = run_case(case, ctx, work / "cases" / f"{i:03d}")
        out.append((case.door, case.name, ok, detail))
        if verbose:
            print("ok  " if ok else "FAIL", case.door, "|", case.name, "|", detail[:240], flush=True)
    return out


if __name__ == "__main__":  # python -m reliability_tables.doors [--quick]: each row as it runs
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows(Path(tmp), quick="--quick" in sys.argv, verbose=True)
