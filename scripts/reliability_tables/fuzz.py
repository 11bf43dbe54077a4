"""Fuzzed inputs (Hypothesis, derandomized): generated configs through `pm-hf check`, a sample of the valid ones
trained, and generated Python task inputs through `ContinualTrainer`. Every case must either validate or be refused
by the contract; the strategies are `fuzz_cases.py`.

- check: a YAML config over the real fields (base_config's tiny run, some fields changed, dropped or unknown, some
  given as flags, odd files, generated data) through `pm_hf.commands.cli.main(["check", ...])` in this process:
  exit 0, or exit 2 with exactly one line `pm-hf: error: <field> = <value>: <fix>` (a library's warning may come
  before it, as `common.contract_error` allows; the logging handlers' output is judged too), no traceback, and
  nothing under the case's folder created or changed.
- train: configs of bounded size that `check` validates are trained (1 epoch, the tiny model): exit 0 and a
  results.json, or the case fails ("validates" must mean "runs").
- api: tasks (rows, Datasets, images of odd modes and sizes) given to `ContinualTrainer`; building its stream raises
  nothing but `InputError` (before anything is written under the case's folder), and a stream that builds collates a
  batch of every task (text: which the model takes).

Each row: (door, "N generated ...", ok, "n validated / m refused by the contract / k other"); ok when k is 0.
The cases are derandomized but depend on the modules imported: Hypothesis mixes constants it finds in the local
source modules loaded (pm_hf, scripts/) into what it draws, so the table run after the others (`python
scripts/reliability.py`, every module loaded) tries other cases than run alone; both must pass.
`python scripts/reliability.py fuzz` runs the full table, `--quick` the default test tier's sample.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from .common import _DROP, ERROR_LINE, _tree, base_config, make_assets
from .fuzz_cases import api_tasks, config_cases, field_changes

# Hypothesis keeps caches (constants, Unicode data) in ./.hypothesis even without an example database: not in the repo.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "pm_hf_hypothesis"))

KIND = "fuzzed"
TITLE = "generated inputs validate or are refused by the contract (exit 2, one error line, nothing written)"
QUICK = {"check": 160, "train": 1, "api": 12}
FULL = {"check": 3000, "train": 8, "api": 300}
_counter = itertools.count()


# ------------------------------------------------------------------------------------------- the check door
def write_data(folder: Path, data: dict) -> dict:
    """The generated splits as files in `data["format"]` (csv with `non_utf8`: Latin-1 bytes in the text)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "test"):
        frame = pd.DataFrame(data[split], columns=None if data[split] else data["columns"])
        path = folder / f"{split}.{data['format']}"
        if data["format"] == "parquet":
            try:
                frame.to_parquet(path)
            except Exception:  # noqa: BLE001 - mixed types pyarrow cannot store: the same rows as text
                frame.astype(str).to_parquet(path)
        elif data["format"] == "csv":
            frame.to_csv(path, index=False)
            if data.get("non_utf8"):
                path.write_bytes(path.read_bytes() + "caf\xe9,1\n".encode("latin-1"))
        else:
            frame.to_json(path, orient="records", lines=True)
        files[split] = str(path)
    return files


def _output_dir(case: Path, form: str) -> Path:
    if form == "file":
        (case / "out").write_text("a file where the run folder should go\n")
    elif form == "under-file":
        (case / "blocker").write_text("a file above the run folder\n")
        return case / "blocker" / "out"
    elif form == "empty-dir":
        (case / "out").mkdir()
    elif form == "odd-name":
        return case / "ün ïcode out-\u2028"
    return case / "out"


def write_case(case_dir: Path, case: dict, assets: dict) -> tuple[Path, list[str]]:
    """The case's config file (and data, output folder blockers) under `case_dir`; (the config's path, the flags)."""
    case_dir.mkdir(parents=True)
    out = _output_dir(case_dir, case["out"])
    changes = dict(case["changes"])
    if case["data"] is not None:
        changes["data_files"] = write_data(case_dir / "data", case["data"])
        if case["data"].get("builder"):
            changes["dataset_name"] = case["data"]["builder"]
    config = base_config(assets, out, **changes)
    path = case_dir / "config.yaml"
    form = case["form"]
    if form == "bytes":
        path.write_bytes(b"r: 4\nmax_length: \xff\xfe\x80 16\n")
    elif form in ("list", "scalar"):
        path.write_text(yaml.safe_dump(list(config) if form == "list" else "just text"))
    elif form == "empty":
        path.write_text("")
    else:
        text = yaml.safe_dump(config, allow_unicode=True)
        path.write_text(text + ("r: 2\n" if form == "twice" else ""), encoding="utf-8")
    return path, list(case["flags"])


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`pm-hf ARGV` in this process: (exit code, stdout, stderr); an exception escaping `main` is re-raised."""
    from pm_hf.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _log_handlers_to(err):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _log_handlers_to(stream):
    """Logging handlers that write to the process's stderr (bound when the library configured them, so
    `redirect_stderr` misses them; under pytest, to the capture of the moment) write to `stream` meanwhile: what a
    user would see on stderr is judged."""
    import logging
    import sys

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if hasattr(v, "handlers"))]
    moved = [h for lg in loggers for h in lg.handlers
             if type(h) is logging.StreamHandler and h.stream not in (sys.__stdout__, sys.stdout)]  # fmt: skip
    old = [h.setStream(stream) for h in moved]
    try:
        yield
    finally:
        for handler, previous in zip(moved, old):
            handler.setStream(previous)


def judge(code, stderr: str, before: dict, after: dict) -> tuple[str, str]:
    """("validated" | "refused" | "other", detail) of one command by the contract."""
    changed = sorted(set(before) ^ set(after) | {p for p in set(before) & set(after) if before[p] != after[p]})
    if changed:
        return "other", f"exit {code}, wrote {changed[:3]}"
    if code == 0:
        return "validated", ""
    lines = [line for line in stderr.splitlines() if line.startswith("pm-hf: error:")]  # as `contract_error`:
    if code == 2 and len(lines) == 1 and ERROR_LINE.match(lines[0]) and "Traceback" not in stderr:  # warnings pass
        return "refused", lines[0]
    return "other", f"exit {code}: {stderr.strip()[-400:]}"


def check_case(case: dict, assets: dict, work: Path) -> tuple[str, str]:
    """One generated config through `pm-hf check`, judged by the contract."""
    case_dir = work / f"case{next(_counter)}"
    path, flags = write_case(case_dir, case, assets)
    before = _tree(case_dir)
    try:
        code, _, stderr = run_cli(["check", str(path), *flags])
    except Exception as err:  # noqa: BLE001 - an escaping exception is exactly what the case reports
        return "other", f"raised {type(err).__name__}: {str(err)[:300]}"
    return judge(code, stderr, before, _tree(case_dir))


# ------------------------------------------------------------------------------------------- the train door
TRAIN_FIELDS = {
    "merge_method": st.sampled_from(["pm", "seq", "average", "coma", "cofima", "task-arithmetic", "ties", "magmax"]),
    "r": st.integers(-1, 4),
    "lora_alpha": st.sampled_from([0, 0.5, 4, 64]),
    "lora_dropout": st.sampled_from([0.0, 0.3, 1.0]),
    "perturb_eps": st.sampled_from([0.0, 0.25, 0.9, 1.0]),
    "perturb_probs": st.sampled_from([[0, 1, 0], [0.5, 0, 0.5], [1 / 3] * 3, [0.5, 0.5, 0.5]]),
    "perturbation": st.sampled_from(["task_vector", "gaussian", "none"]),
    "fisher_mode": st.sampled_from(["per_sample", "batch"]),
    "fisher_labels": st.sampled_from(["empirical", "sampled"]),
    "fisher_max_samples": st.sampled_from([1, 3, None]),
    "fisher_batch_size": st.integers(1, 5),
    "alpha_clip": st.booleans(),
    "alpha_min": st.sampled_from([0.0, 0.5, 1.0]),
    "head_align": st.sampled_from(["none", "task", "prototypes"]),
    "head_align_steps": st.integers(1, 3),
    "per_device_train_batch_size": st.integers(1, 9),
    "gradient_accumulation_steps": st.integers(1, 3),
    "max_steps": st.sampled_from([-1, 1, 2]),
    "max_length": st.integers(2, 12),
    "class_groups": st.sampled_from([[[0, 1], [2, 3]], [[0, 1, 2, 3]], [[3, 0], [2, 1]], [[4, 5]]]),
    "scenario": st.sampled_from(["class_incremental", "task_incremental"]),
    "max_train_samples_per_class": st.sampled_from([1, 2, 4]),
    "learning_rate": st.sampled_from([1e-4, 0.02, 1.0]),
}


TRAIN_BASE = {"class_groups": [[0, 1], [2, 3]], "max_train_samples_per_class": 4, "fisher_max_samples": 4,
              "per_device_eval_batch_size": 16}  # two small tasks: a run in seconds  # fmt: skip


@st.composite
def train_cases(draw) -> dict:
    names = draw(st.lists(st.sampled_from(sorted(TRAIN_FIELDS)), min_size=1, max_size=5, unique=True))
    return {name: draw(TRAIN_FIELDS[name]) for name in names}


def train_case(changes: dict, assets: dict, work: Path) -> tuple[str, str]:
    """A bounded config: `check` first; one it validates must train (exit 0, results.json written)."""
    case_dir = work / f"case{next(_counter)}"
    case_dir.mkdir(parents=True)
    out = case_dir / "out"
    path = case_dir / "config.yaml"
    path.write_text(yaml.safe_dump(base_config(assets, out, **{**TRAIN_BASE, **changes})))
    before = _tree(case_dir)
    code, _, stderr = run_cli(["check", str(path)])
    outcome, detail = judge(code, stderr, before, _tree(case_dir))
    if outcome != "validated":
        return outcome, detail
    try:
        code, _, stderr = run_cli(["train", "--config", str(path)])
    except Exception as err:  # noqa: BLE001
        return "other", f"check validated it, train raised {type(err).__name__}: {str(err)[:300]}"
    if code != 0 or not (out / "results.json").is_file():
        return "other", f"check validated it, train exited {code}: {stderr.strip()[-300:]}"
    return "validated", "trained"


# --------------------------------------------------------------------------------------------- the api door
def api_case(case: dict, assets: dict, work: Path) -> tuple[str, str]:
    from .fuzz_api import run_api_case

    case_dir = work / f"case{next(_counter)}"
    case_dir.mkdir(parents=True)
    before = _tree(case_dir)
    outcome, detail = run_api_case(case, assets, case_dir)
    if outcome == "refused" and _tree(case_dir) != before:  # e.g. output_dir made by the model's load, then refused
        return "other", f"{detail} (after writing {sorted(set(_tree(case_dir)) ^ set(before))[:2]})"
    return outcome, detail


# ------------------------------------------------------------------------------------------------- running
def explore(strategy, run_one, n: int) -> list[tuple[str, str]]:
    """`n` generated cases (derandomized, no shrinking) through `run_one`: their (outcome, detail)."""
    outcomes: list[tuple[str, str]] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def run(case):
        outcomes.append(run_one(case))

    run()
    return outcomes


def prepare(work: Path) -> dict:
    """The shared tiny assets, and a datasets cache inside `work` (generated files are not cached elsewhere)."""
    import datasets

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    datasets.config.HF_DATASETS_CACHE = Path(work) / "datasets_cache"
    datasets.disable_progress_bars()
    return make_assets(Path(work) / "assets")


def row(door: str, what: str, outcomes: list[tuple[str, str]]) -> tuple[str, str, bool, str]:
    counts = {k: sum(o == k for o, _ in outcomes) for k in ("validated", "refused", "other")}
    others = [d for o, d in outcomes if o == "other"]
    detail = f"{counts['validated']} validated / {counts['refused']} refused by the contract / {counts['other']} other"
    if others:
        detail += f"; first: {others[0]}"
    return door, f"{len(outcomes)} generated {what}", not others, detail


def case_counts(row: tuple[str, str, bool, str]) -> tuple[int, int]:
    """(cases tried, cases by the contract) of one row: a row sums many generated cases."""
    validated, refused, other = (int(n) for n in re.findall(r"(\d+) (?:validated|refused|other)", row[3])[:3])
    return validated + refused + other, validated + refused


def rows(work: Path, quick: bool) -> list[tuple[str, str, bool, str]]:
    sizes = QUICK if quick else FULL
    work = Path(work)
    assets = prepare(work)
    doors = [
        ("check", "configs", config_cases(), check_case),
        ("train", "bounded configs (trained when valid)", train_cases(), train_case),
        ("api", "task inputs (text and images)", st.one_of(api_tasks(), api_tasks(image=True)), api_case),
    ]
    out = []
    for door, what, strategy, runner in doors:
        outcomes = explore(strategy, lambda case, r=runner, d=door: r(case, assets, work / d), sizes[door])
        out.append(row(door, what, outcomes))
    return out


__all__ = [
    "rows",
    "case_counts",
    "check_case",
    "train_case",
    "api_case",
    "explore",
    "prepare",
    "field_changes",
    "_DROP",
]
