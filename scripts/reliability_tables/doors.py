"""Bad input at every door but `train` (whose configs are the bad-configs table): `pm-hf evaluate | export | push |
merge | check` and the Python API (`ContinualTrainer`). A command's case passes when it exits 2 with one line
`pm-hf: error: <field> = <value>: <fix>` naming the field the case expects, no traceback, and nothing under the
table's folder is created or changed (the case's own folder, the shared run and adapters), nor anything on the Hub
stand-in (`tests/hub_standin.py`); an API case when it raises `InputError` naming the Python argument, with nothing
written. The inputs are those a new user gets wrong: a run folder that is missing, a file, empty, someone else's or
killed before its first checkpoint; an export or merge destination that is a file or holds other files; a repository
id the Hub refuses; adapters that are missing, broken or trained otherwise; a test class never trained."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .common import ROOT, _tree, base_config, contract_error, make_assets

KIND = "bad inputs"
TITLE = "bad input at evaluate, export, push, merge, check and the API: refused by the contract, nothing written"


@dataclass
class Case:
    door: str
    name: str
    expect: str  # the field the error line names (the API: the Python argument)
    make: Callable  # (ctx, folder) -> argv (a command's) or a thunk that raises (the API's)
    quick: bool = False  # in the default test tier's sample
    needs: tuple = ()  # what of the context it uses: "run", "adapters" (built once, only when a case needs them)


# ------------------------------------------------------------------------------------------------ the shared inputs
def _train_run(assets: dict, out: Path, stop_after: int | None = None) -> str:
    from pm_hf.commands.parsing import parse_config
    from pm_hf.continual import run_continual

    out.parent.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, out, class_groups=[[0, 1], [2, 3]])))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_continual(*parse_config(str(config)), stop_after=stop_after)
    return str(out)


def _adapter(model: str, folder: Path, seed: int, num_labels: int | None = None, **lora) -> str:
    """A SEQ_CLS LoRA adapter as plain PEFT saves it (its head in `modules_to_save`), random factors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    extra = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    with contextlib.redirect_stderr(io.StringIO()):
        base = AutoModelForSequenceClassification.from_pretrained(model, **extra)
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"], **lora}
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **config)).save_pretrained(folder)
    return str(folder)


def _adapters(assets: dict, folder: Path) -> dict:
    model = assets["model"]
    other = shutil.copytree(model, folder / "other_base")
    return {
        "a": _adapter(model, folder / "a", 0),
        "b": _adapter(model, folder / "b", 1),
        "wide": _adapter(model, folder / "wide", 2, num_labels=4),
        "query_only": _adapter(model, folder / "query_only", 3, target_modules=["query"]),
        "r4": _adapter(model, folder / "r4", 4, r=4),
        "other_base": _adapter(str(other), folder / "other_base_adapter", 5),
    }


class Context:
    """The assets, and what the cases share, built on first use: a finished 2-task run, plain PEFT adapters."""

    def __init__(self, work: Path):
        self.work = work
        self.assets = make_assets(work / "assets")
        self._run = self._adapters = None

    @property
    def run(self) -> str:
        if self._run is None:
            self._run = _train_run(self.assets, self.work / "shared" / "run")
        return self._run

    @property
    def adapters(self) -> dict:
        if self._adapters is None:
            self._adapters = _adapters(self.assets, self.work / "shared" / "adapters")
        return self._adapters

    def config(self, folder: Path, **fields) -> str:
        """A data config of the assets (output_dir inside `folder`, not created), its path."""
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(base_config(self.assets, folder / "out", **fields)))
        return str(path)


# ------------------------------------------------------------------------------------------------ odd run folders
def _a_file(folder: Path, name: str = "thing") -> str:
    (folder / name).write_text("a file, not a folder\n")
    return str(folder / name)


def _empty(folder: Path) -> str:
    (folder / "empty").mkdir()
    return str(folder / "empty")


def _foreign(folder: Path) -> str:
    (folder / "photos").mkdir()
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not a run")
    return str(folder / "photos")


def _killed(folder: Path) -> str:
    """A run killed during its first task: the lock and a task's trainer files, no checkpoint (latest.json)."""
    run = folder / "killed"
    (run / "tasks" / "task_0").mkdir(parents=True)
    (run / ".pm_hf.lock").write_text("")
    (run / "tasks" / "task_0" / "trainer_state.json").write_text("{}")
    return str(run)


def _broken_latest(folder: Path) -> str:
    run = folder / "broken"
    run.mkdir()
    (run / "latest.json").write_text("{not json")
    return str(run)


RUN_FOLDERS = {
    "missing": lambda f: str(f / "nowhere"),
    "a file": _a_file,
    "an empty folder": _empty,
    "a folder of photos": _foreign,
    "killed before its first checkpoint": _killed,
    "latest.json unreadable": _broken_latest,
}


def _export_like(folder: Path) -> str:
    """A folder that looks like an adapter but is no pm_hf export (no pm_hf_export.json)."""
    (folder / "exp").mkdir()
    (folder / "exp" / "adapter_config.json").write_text("{}")
    return str(folder / "exp")


# ------------------------------------------------------------------------------------------------ the cases
def _evaluate_cases() -> list[Case]:
    cases = [
        Case(
            "evaluate",
            f"run_dir {what}",
            "run_dir",
            lambda c, f, m=make: ["evaluate", m(f)],
            quick=what != "a folder of photos",
        )
        for what, make in RUN_FOLDERS.items()
    ]
    return cases + [
        Case("evaluate", "an option without --config", "options", lambda c, f: ["evaluate", str(f), "--task", "5"]),
        Case(
            "evaluate",
            "--config missing",
            "config",
            lambda c, f: ["evaluate", _export_like(f), "--config", str(f / "no.yaml")],
        ),
        Case(
            "evaluate",
            "not an export, with --config",
            "model",
            lambda c, f: ["evaluate", _export_like(f), "--config", c.config(f)],
        ),
        Case(
            "evaluate",
            "an unknown data field",
            "--max_lenght",
            lambda c, f: ["evaluate", _export_like(f), "--config", c.config(f), "--max_lenght", "8"],
        ),
    ]


def _export_cases() -> list[Case]:
    out = lambda f: ["--output", str(f / "export")]  # noqa: E731
    cases = [
        Case(
            "export",
            f"run_dir {what}",
            "run_dir",
            lambda c, f, m=make: ["export", m(f), *out(f)],
            quick=what == "missing",
        )
        for what, make in RUN_FOLDERS.items()
    ]
    run = ("run",)
    return cases + [
        Case("export", "no --output", "output", lambda c, f: ["export", str(f)], quick=True),
        Case("export", "an unknown mode", "mode", lambda c, f: ["export", c.run, "--mode", "lora", *out(f)], needs=run),
        Case(
            "export",
            "adapter-svd without --rank",
            "rank",
            lambda c, f: ["export", c.run, "--mode", "adapter-svd", *out(f)],
            needs=run,
        ),
        Case(
            "export",
            "--rank 0",
            "rank",
            lambda c, f: ["export", c.run, "--mode", "adapter-svd", "--rank", "0", *out(f)],
            needs=run,
        ),
        Case(
            "export",
            "--rank with mode adapter",
            "rank",
            lambda c, f: ["export", c.run, "--rank", "4", *out(f)],
            needs=run,
        ),
        Case(
            "export",
            "per-task of a classifier run",
            "mode",
            lambda c, f: ["export", c.run, "--mode", "per-task", *out(f)],
            needs=run,
        ),
        Case(
            "export", "--output the run folder", "output", lambda c, f: ["export", c.run, "--output", c.run], needs=run
        ),
        Case("export", "--output a file", "output", lambda c, f: ["export", c.run, "--output", _a_file(f)], needs=run),
        Case(
            "export",
            "--output under a file",
            "output",
            lambda c, f: ["export", c.run, "--output", str(Path(_a_file(f)) / "export")],
            needs=run,
        ),
        Case(
            "export",
            "--output a folder of photos",
            "output",
            lambda c, f: ["export", c.run, "--output", _foreign(f)],
            needs=run,
        ),
    ]


def _push_cases() -> list[Case]:
    repo = ["--hub_model_id", "me/model", "--hub_token", "TOKEN"]
    cases = [
        Case("push", f"run_dir {what}", "run_dir", lambda c, f, m=make: ["push", m(f), *repo], quick=what == "missing")
        for what, make in RUN_FOLDERS.items()
    ]
    run = ("run",)

    def push(hub_id: str, token: str = "TOKEN") -> Callable:
        return lambda c, f: ["push", c.run, "--hub_model_id", hub_id, "--hub_token", token]

    def bad_id(hub_id: str) -> Callable:  # checked before the run folder: any folder will do
        return lambda c, f: ["push", str(f), "--hub_model_id", hub_id, "--hub_token", "TOKEN"]

    return cases + [
        Case("push", "no --hub_model_id", "hub_model_id", lambda c, f: ["push", str(f)], quick=True),
        *[
            Case("push", f"hub_model_id {bad!r}", "hub_model_id", bad_id(bad), quick=True)
            for bad in ("me/model name", "me/a/b", "me/", "me/--model", "me/" + "x" * 97)
        ],
        Case("push", "a read-only token", "hub_token", push("me/model", "READ"), needs=run),
        Case("push", "an unknown token", "hub_token", push("me/model", "hf_nobody"), needs=run),
        Case("push", "another user's namespace", "hub_model_id", push("someone/model"), needs=run),
        Case(
            "push",
            "--revision not a branch name",
            "revision",
            lambda c, f: ["push", str(f), *repo, "--revision", "bad..name"],
            quick=True,
        ),
    ]


def _merge_cases() -> list[Case]:
    out = lambda f: ["--output", str(f / "merged")]  # noqa: E731
    ads = ("adapters",)

    def merge(*names: str, method: str = "ties", extra: tuple = ()) -> Callable:
        return lambda c, f: [
            "merge",
            "--adapters",
            *[c.adapters[n] for n in names],
            "--merge_method",
            method,
            *extra,
            *out(f),
        ]

    return [
        Case(
            "merge",
            "an adapter missing",
            "adapters",
            lambda c, f: ["merge", "--adapters", str(f / "a"), str(f / "b"), *out(f)],
            quick=True,
        ),
        Case(
            "merge",
            "an adapter a file",
            "adapters",
            lambda c, f: ["merge", "--adapters", _a_file(f), _a_file(f, "b"), *out(f)],
            quick=True,
        ),
        Case("merge", "no --output", "output", lambda c, f: ["merge", "--adapters", str(f)], quick=True),
        Case(
            "merge",
            "an adapter a folder of photos",
            "adapters",
            lambda c, f: ["merge", "--adapters", c.adapters["a"], _foreign(f), *out(f)],
            needs=ads,
        ),
        Case(
            "merge",
            "adapter weights unreadable",
            "adapters",
            lambda c, f: ["merge", "--adapters", c.adapters["a"], _broken_adapter(c, f), *out(f)],
            needs=ads,
        ),
        Case("merge", "another base", "base_model_name_or_path", merge("a", "other_base"), needs=ads),
        Case("merge", "other target modules", "target_modules", merge("a", "query_only"), needs=ads),
        Case("merge", "another rank", "r", merge("a", "r4"), needs=ads),
        Case("merge", "a head of another size", "classifier.weight", merge("a", "wide"), needs=ads),
        Case("merge", "an unknown merge_method", "merge_method", merge("a", "b", method="tie"), needs=ads),
        Case("merge", "a method that needs data", "merge_method", merge("a", "b", method="pm"), needs=ads),
        Case("merge", "merge_scale nan", "merge_scale", merge("a", "b", extra=("--merge_scale", "nan")), needs=ads),
        Case(
            "merge",
            "merge_scale not a number",
            "merge_scale",
            merge("a", "b", extra=("--merge_scale", "big")),
            needs=ads,
        ),
        Case("merge", "an unknown option", "--scale", merge("a", "b", extra=("--scale", "2")), needs=ads),
        Case(
            "merge",
            "--output a file",
            "output",
            lambda c, f: [
                "merge",
                "--adapters",
                c.adapters["a"],
                c.adapters["b"],
                "--merge_method",
                "ties",
                "--output",
                _a_file(f),
            ],
            needs=ads,
        ),
        Case(
            "merge",
            "--output a folder of photos",
            "output",
            lambda c, f: [
                "merge",
                "--adapters",
                c.adapters["a"],
                c.adapters["b"],
                "--merge_method",
                "ties",
                "--output",
                _foreign(f),
            ],
            needs=ads,
        ),
        Case(
            "merge",
            "--config: heads of another size",
            "classifier.weight",
            lambda c, f: [
                "merge",
                "--adapters",
                c.adapters["a"],
                c.adapters["b"],
                "--config",
                c.config(f, class_groups=[[0, 1], [2, 3]]),
                "--output",
                str(f / "new" / "merged"),
            ],
            needs=ads,
        ),
        Case(
            "merge",
            "--config: more tasks than adapters",
            "adapters",
            lambda c, f: [
                "merge",
                "--adapters",
                c.adapters["wide"],
                "--config",
                c.config(f, class_groups=[[0, 1], [2, 3]]),
                *out(f),
            ],
            needs=ads,
        ),
        Case(
            "merge",
            "--config: another model",
            "model_name_or_path",
            lambda c, f: [
                "merge",
                "--adapters",
                c.adapters["a"],
                c.adapters["b"],
                "--config",
                c.config(f, model_name_or_path=str(ROOT / "data" / "tiny-bert")),
                *out(f),
            ],
            needs=ads,
        ),
    ]


def _broken_adapter(ctx: Context, folder: Path) -> str:
    broken = shutil.copytree(ctx.adapters["b"], folder / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    return str(broken)


def _check_cases() -> list[Case]:
    def check(**fields) -> Callable:
        return lambda c, f: ["check", c.config(f, **fields)]

    return [
        Case("check", "no config", "config", lambda c, f: ["check"], quick=True),
        Case("check", "config missing", "config", lambda c, f: ["check", str(f / "no.yaml")], quick=True),
        Case("check", "config not a mapping", "config", lambda c, f: ["check", _yaml(f, "- a\n- b\n")], quick=True),
        Case("check", "output_dir a file", "output_dir", lambda c, f: ["check", c.config(f, output_dir=_a_file(f))]),
        Case(
            "check", "output_dir of photos", "output_dir", lambda c, f: ["check", c.config(f, output_dir=_foreign(f))]
        ),
        Case("check", "model missing", "model_name_or_path", check(model_name_or_path="/nowhere/model")),
        Case("check", "class_groups with a class not in the data", "class_groups", check(class_groups=[[0, 1], [7]])),
        Case("check", "a test class never trained", "eval_split", lambda c, f: ["check", _eval_only(c, f)]),
        Case(
            "check",
            "a data file missing",
            "data_files",
            lambda c, f: ["check", c.config(f, data_files={"train": str(f / "no.parquet")})],
        ),
        Case("check", "text_column absent", "text_column", check(text_column="sentence")),
    ]


def _yaml(folder: Path, text: str) -> str:
    (folder / "c.yaml").write_text(text)
    return str(folder / "c.yaml")


def _eval_only(ctx: Context, folder: Path) -> str:
    """The test split holds class 5, which the training split lacks."""
    import pandas as pd

    train = pd.read_parquet(ctx.assets["files"]["train"])
    path = folder / "train.parquet"
    train[train.label != 5].to_parquet(path)
    return ctx.config(
        folder, data_files={"train": str(path), "test": ctx.assets["files"]["test"]}, class_groups=[[0, 1], [2, 3, 4]]
    )


# ------------------------------------------------------------------------------------------------ the API
def _api(ctx: Context, folder: Path, tasks=None, model=None, **kw) -> Callable:
    """A thunk building and training a `ContinualTrainer` on the assets (`args` fields in `kw`)."""
    from pm_hf import ContinualTrainer, PMConfig
    from pm_hf.config.groups import FisherArguments, LoraArguments

    groups = {k: kw.pop(k) for k in ("merge_args", "data_args") if k in kw}
    given = kw.pop("args_object", None)

    def go():
        args = given or PMConfig(
            **{
                "output_dir": str(folder / "out"),
                "num_train_epochs": 1,
                "report_to": [],
                "per_device_train_batch_size": 8,
                "use_cpu": True,
                "disable_tqdm": True,
                **kw,
            }
        )
        trainer = ContinualTrainer(
            model=model or ctx.assets["model"],
            args=args,
            tasks=_tasks(ctx) if tasks is None else tasks,
            lora_args=LoraArguments(r=2),
            fisher_args=FisherArguments(fisher_max_samples=8),
            **groups,
        )
        trainer.train()

    return go


def _tasks(ctx: Context, *groups: list[int], drop_train: int | None = None) -> list[dict]:
    import datasets
    import pandas as pd

    frames = {s: pd.read_parquet(ctx.assets["files"][s])[["text", "label"]] for s in ("train", "test")}
    out = []
    for classes in groups or ([0, 1], [2, 3]):
        task = {}
        for split, frame in frames.items():
            keep = frame.label.isin(classes) & ~((frame.label == drop_train) & (split == "train"))
            task[split] = datasets.Dataset.from_pandas(frame[keep], preserve_index=False)
        out.append(task)
    return out


def _training_arguments(folder: Path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(folder / "out"), use_cpu=True, report_to=[], **kw)


def _api_cases() -> list[Case]:
    from pm_hf.config.groups import DataArguments, MergeArguments

    def rows(c):
        return [dict(r) for r in _tasks(c)[0]["train"]]

    return [
        Case("api", "args a dict", "args", lambda c, f: _api(c, f, args_object={"output_dir": str(f)}), quick=True),
        Case("api", "model a number", "model", lambda c, f: _api(c, f, model=42), quick=True),
        Case(
            "api",
            "an unknown merge_method",
            "merge_args.merge_method",
            lambda c, f: _api(c, f, merge_args=MergeArguments(merge_method="tie")),
            quick=True,
        ),
        Case("api", "tasks a flat list of rows", "tasks", lambda c, f: _api(c, f, tasks=rows(c))),
        Case("api", "tasks one DatasetDict", "tasks", lambda c, f: _api(c, f, tasks=_tasks(c)[0])),
        Case("api", "no tasks", "tasks", lambda c, f: _api(c, f, tasks=[])),
        Case(
            "api",
            "TrainingArguments with a hub_strategy of its own",
            "args.hub_strategy",
            lambda c, f: _api(c, f, args_object=_training_arguments(f, hub_strategy="checkpoint")),
        ),
        Case("api", "a task a set", "tasks[1]", lambda c, f: _api(c, f, tasks=[_tasks(c)[0], {1, 2}])),
        Case(
            "api",
            "a test class absent from training",
            "tasks[1]",
            lambda c, f: _api(c, f, tasks=_tasks(c, [0, 1], [2, 3, 4], drop_train=4)),
        ),
        Case(
            "api",
            "the first task's test class absent",
            "tasks[0]",
            lambda c, f: _api(c, f, tasks=_tasks(c, [0, 1, 2], drop_train=2)),
        ),
        Case(
            "api",
            "text_column absent",
            "data_args.text_column",
            lambda c, f: _api(c, f, data_args=DataArguments(text_column="sentence")),
        ),
        Case("api", "output_dir a file", "output_dir", lambda c, f: _api(c, f, output_dir=_a_file(f))),
        Case("api", "output_dir of photos", "args.output_dir", lambda c, f: _api(c, f, output_dir=_foreign(f))),
        Case("api", "resume_from nowhere", "args.resume_from", lambda c, f: _api(c, f, resume_from=str(f / "nowhere"))),
    ]


CASES = [*_evaluate_cases(), *_export_cases(), *_push_cases(), *_merge_cases(), *_check_cases(), *_api_cases()]
QUICK_API = {"tasks a flat list of rows", "tasks one DatasetDict", "no tasks", "a task a set", "output_dir of photos",
             "a test class absent from training", "resume_from nowhere"}  # fmt: skip
for _case in CASES:
    _case.quick = _case.quick or (_case.door == "api" and _case.name in QUICK_API)


# ------------------------------------------------------------------------------------------------ running a case
@contextlib.contextmanager
def _hub_standin(folder: Path):
    """The Hub stand-in in place of the client (no login here: only --hub_token counts); 'TOKEN' writes, 'READ'
    reads."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import hub_standin

        import pm_hf.hub.repository as repository
    finally:
        sys.path.remove(str(ROOT / "tests"))
    fake = hub_standin.FakeHub(tokens=("TOKEN",), read_tokens=("READ",), cache_dir=folder)
    saved = repository.HfApi, repository.get_token
    repository.HfApi, repository.get_token = fake.api, lambda: None
    try:
        yield fake
    finally:
        repository.HfApi, repository.get_token = saved


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


def run_case(case: Case, ctx: Context, folder: Path) -> tuple[bool, str]:
    """One case: (passed, the error line or what went wrong instead)."""
    folder.mkdir(parents=True)
    for need in case.needs:
        getattr(ctx, need)  # built before the snapshot
    with _hub_standin(ctx.work / "hub_cache") as hub:
        made = case.make(ctx, folder)
        before = _tree(ctx.work)
        if case.door == "api":
            ok, detail = _api_error(made, case.expect)
        else:
            code, stderr = _command(made)
            ok, detail = contract_error(code, stderr, case.expect)
        writes = [
            call
            for call in hub.calls
            if call[0] in ("create_repo", "create_branch", "create_commit", "create_tag", "delete_tag")
        ]
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


def rows(work: Path, quick: bool) -> list[tuple[str, str, bool, str]]:
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(work)
    out = []
    for i, case in enumerate(c for c in CASES if c.quick or not quick):
        ok, detail = run_case(case, ctx, work / "cases" / f"{i:03d}")
        out.append((case.door, case.name, ok, detail))
        if _VERBOSE:
            print(("ok  " if ok else "FAIL"), case.door, "|", case.name, "|", detail[:240], flush=True)
    return out


_VERBOSE = False


def _smoke() -> None:  # python -m reliability_tables.doors [--quick]: each row as it runs
    import tempfile

    global _VERBOSE
    _VERBOSE = True
    with tempfile.TemporaryDirectory() as tmp:
        rows(Path(tmp), quick="--quick" in sys.argv)


if __name__ == "__main__":
    _smoke()
