"""What can be done with a finished run folder or an export: evaluate it again, export it (`pm-hf export`), push it
(`pm-hf push`), and evaluate an export folder or Hub model on a data config (`pm-hf evaluate EXPORT --config`)."""

from __future__ import annotations

import copy
import dataclasses
import filecmp
import glob
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from peft import PeftConfig, PeftModel
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from ..config.checks import invalid
from ..config.groups import RunConfig
from ..data.sources import FILE_BUILDERS
from ..hub.export import INFO
from ..hub.origin import resolve_base
from ..hub.repository import connect, download_export
from .assembly import build_loop
from .checkpoint import LATEST, dataclasses_from_config, load_checkpoint
from .inputs import branch, export_mode, export_target, repo_id, run_folder
from .loop import ContinualLoop
from .metrics import seen_accuracy
from .results import write_outputs
from .run_export import export_run, push_task
from .rundir import checkpoint_view, lock_if_idle, refuse_changes

# Settings a run folder may hold that evaluating or exporting it must never act on: trackers, Hub pushes, and how
# its training was launched (FSDP, DeepSpeed: a saved run is evaluated and exported by one process, whole).
QUIET = {"report_to": "none", "push_to_hub": False, "hub_model_id": None, "hub_token": None, "resume_from": None,
         "deepspeed": None, "fsdp": "", "fsdp_config": None}  # fmt: skip
MODEL_CLASSES = {
    "sequence_classification": AutoModelForSequenceClassification,
    "image_classification": AutoModelForImageClassification,
    "causal_lm": AutoModelForCausalLM,
}


def load_run(run_dir: str | Path, hub=None, view: Path | None = None, **training: object) -> ContinualLoop:
    """A finished (or stopped, or still training) run rebuilt from its last checkpoint, verified, with the merged
    weights loaded and its log; trackers and Hub settings stored in the run folder are ignored (`hub` and the
    `PMConfig` fields in `training` are this call's: a push's). A changed model or data is refused. `view`: the
    run folder's `checkpoint_view`, which the loop then reads (its folder)."""
    out = Path(run_dir)
    if not out.is_dir():
        raise invalid("run_dir", str(run_dir), "not found: pass the output_dir of a `pm-hf train` run.")
    view = Path(view or out)
    loaded = load_checkpoint(view)
    if loaded is None:
        raise invalid("run_dir", str(run_dir), "holds no checkpoint (latest.json): pass the output_dir of a run.")
    state, saved = loaded
    data = saved.get("DataArguments", {})
    if data.get("dataset_name") in FILE_BUILDERS and not data.get("data_files") and not data.get("task_datasets"):
        fix = "was trained on datasets given in Python, which a run folder does not record: export or push it from "
        raise invalid("run_dir", str(run_dir), fix + "its ContinualTrainer (save_model, push_to_hub, evaluate).")
    recorded = saved.get("PMConfig", {}).get("output_dir") or str(out)
    source = from_launch_folder(saved, out)  # its relative data and model paths, read where it was launched
    groups = dataclasses_from_config(source, {"PMConfig": {**QUIET, "output_dir": str(view), **training}})
    loop = build_loop(RunConfig(*groups), hub=hub)
    refuse_changes(source, loop.config, out, training=False)  # the model and the data; not how it was launched
    # the record stays the run's (how it trained, the pm_hf that trained it, its peak memory), not this call's: an
    # export (an export records its own version apart) or a re-evaluation writes the same results.json every time
    loop.config = copy.deepcopy(saved)
    trained = {"output_dir": recorded, **_recorded(out, ("peak_rss_mb", "distributed"))}
    loop.results = lambda: {**ContinualLoop.results(loop), **trained}
    loop.restore(state)
    if view != out:  # the loop reads the view; results.json and the plots are the checkpoint's
        write_outputs(view, loop.results())
    return loop


def launch_folders(out: Path, recorded: str) -> list[Path]:
    """The folders a run may have been launched from: the run folder's path less its recorded relative `output_dir`
    (`outputs/demo` of `/home/me/proj/outputs/demo` gives `/home/me/proj`, wherever the project has moved since),
    from the path as given (symlinks kept), then resolved; none where the recorded path is absolute or not its end."""
    parts = Path(os.path.normpath(recorded)).parts
    if not parts or Path(recorded).is_absolute() or ".." in parts:
        return []
    found = []
    for here in (Path(os.path.abspath(out)).parts, out.resolve().parts):
        if len(here) > len(parts) and here[-len(parts) :] == parts and Path(*here[: -len(parts)]) not in found:
            found.append(Path(*here[: -len(parts)]))
    return found


def from_launch_folder(saved: dict, out: Path) -> dict:
    """The run record with its relative local paths made absolute under the folder it was launched from, so that
    evaluate, export and push read the run's files from any working directory: the data files of a file builder
    (`parquet`, `json`, ...; the first of `launch_folders` that holds them all), a dataset given as a local folder, and
    a local model (each where that folder holds it); the record as it is otherwise."""
    config = copy.deepcopy(saved)
    folders = launch_folders(out, saved.get("PMConfig", {}).get("output_dir") or "")
    data, model = config.get("DataArguments", {}), config.get("ModelArguments", {})
    specs = [data, *(data.get("task_datasets") or [])]
    builder = lambda spec: spec.get("dataset_name", data.get("dataset_name"))  # noqa: E731 - an entry inherits it
    local = [s for s in specs if builder(s) in FILE_BUILDERS and s.get("data_files")]
    for where in folders:  # the data files: all found under one folder, or none rewritten
        files = _files_under(where, [s["data_files"] for s in local])
        if files is not None:
            for spec, changed in zip(local, files):
                spec["data_files"] = changed
            break
    for spec in specs:  # a dataset folder, never a builder's name
        if spec.get("dataset_name") and spec["dataset_name"] not in FILE_BUILDERS:
            spec["dataset_name"] = _first_under(folders, spec["dataset_name"])
    if model.get("model_name_or_path"):
        model["model_name_or_path"] = _first_under(folders, model["model_name_or_path"])
    return config


def _files_under(where: Path, given: list) -> list | None:
    """Each `data_files` of `given` with its relative paths under `where`; None where one is not there (a glob:
    matching nothing there)."""
    missing = []

    def under(path):
        if not isinstance(path, str) or not path or Path(path).expanduser().is_absolute() or "://" in path:
            return path
        if (where / path).exists() or glob.glob(str(where / path), recursive=True):
            return str(where / path)
        missing.append(path)
        return path

    files = [_map_paths(value, under) for value in given]
    return None if missing else files


def _first_under(folders: list[Path], path: str) -> str:
    """A relative local `path` (a model or dataset folder) under the first of `folders` that holds it, else as is."""
    if not isinstance(path, str) or Path(path).expanduser().is_absolute() or "://" in path:
        return path
    return next((str(w / path) for w in folders if (w / path).exists()), path)


def _map_paths(files, change):
    """`data_files` (a path, a list of them, or a split -> path(s) mapping) with each path changed."""
    if isinstance(files, dict):
        return {split: _map_paths(value, change) for split, value in files.items()}
    if isinstance(files, list):
        return [change(p) for p in files]
    return change(files) if files is not None else None


def _recorded(out: Path, keys: tuple[str, ...]) -> dict:
    """What the run's own results.json records of `keys` (its training's peak memory and launch), None where not."""
    try:
        found = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        found = {}
    return {key: found.get(key) if isinstance(found, dict) else None for key in keys}


def evaluate_run(run_dir: str) -> dict:
    """Re-evaluate every trained task of a saved run; results.json is rewritten from the checkpoint's state.

    Returns:
        {"last_row": primary score per task (accuracy over all seen classes, or the LM's `primary_metric`),
        "acc": sample-weighted mean, "saved_last_row": as saved in the checkpoint's log}.
    """
    with checkpoint_view(run_dir) as view:
        loop = load_run(run_dir, view=view)
        tasks = loop.stream.tasks[: len(loop.log)]
        row = loop.evaluator.evaluate_seen(tasks)[loop.evaluator.primary]
        with lock_if_idle(Path(run_dir)) as idle:  # a run training there writes its own results.json
            if idle and (view == Path(run_dir) or filecmp.cmp(view / LATEST, Path(run_dir) / LATEST, shallow=False)):
                write_outputs(Path(run_dir), loop.results())
    return {
        "last_row": row,
        "acc": seen_accuracy(row, [len(task.eval) for task in tasks]),
        "saved_last_row": loop.log[-1]["scores"][loop.evaluator.primary],
    }


def export_run_dir(run_dir: str | Path, output: str | Path, mode: str = "adapter", rank: int | None = None) -> dict:
    """Write a run's merged model as a self-describing folder (see `ContinualLoop.export`): mode 'adapter' (exact),
    'adapter-svd' (rank `rank`: each module's relative error and the score change are returned) or 'merged'.
    Returns what the folder's pm_hf_export.json records."""
    export_mode(mode, rank)
    run_folder(str(run_dir))
    export_target(str(run_dir), str(output))  # never the run's folder, a file, nor a folder of other files
    with checkpoint_view(run_dir) as view:
        return export_run(load_run(run_dir, view=view), Path(output), mode, rank)


def push_run_dir(run_dir: str | Path, hub_model_id: str, private: bool | None = None, revision: str | None = None,
                 token: str | None = None, push_continual_state: bool = False,
                 overwrite_hub_state: bool = False) -> str:  # fmt: skip
    """Push a run's export (exact adapter, card, plots, and its continual state if asked) to `hub_model_id` in one
    commit; access is checked first, and a repository holding another sequence's continual state is refused unless
    `overwrite_hub_state`. The run may be training: its last complete checkpoint is pushed. Returns the commit id."""
    repo_id(hub_model_id)  # before the Hub is asked anything (it would create the repository)
    branch(revision)
    run_folder(str(run_dir))
    hub = SimpleNamespace(hub_model_id=hub_model_id, hub_token=token, hub_private_repo=private, hub_revision=revision,
                          output_dir=str(run_dir), overwrite_hub_state=overwrite_hub_state)  # fmt: skip
    target = connect(hub)
    with checkpoint_view(run_dir) as view:
        loop = load_run(run_dir, target, view, hub_strategy="end", push_continual_state=push_continual_state)
        return push_task(loop, len(loop.log) - 1)


def read_export_info(folder: Path) -> dict:
    """pm_hf_export.json of an export folder (an error names `model` when there is none)."""
    try:
        return json.loads((Path(folder) / INFO).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise invalid("model", str(folder), f"not a pm_hf export (no readable {INFO}: {type(err).__name__}).") from None


def load_export(source: str, revision: str | None = None):
    """(model with the adapter merged in, tokenizer or image processor, pm_hf_export.json) of an export folder or Hub
    model (downloaded first): the adapter on its base (`load_adapter_export`), or plain `AutoModelFor...` when
    merged. A folder loads wherever it was moved or copied."""
    folder = Path(source) if Path(source).is_dir() else download_export(source, revision)
    info = read_export_info(folder)
    task = info.get("task") if isinstance(info, dict) else None
    if task not in MODEL_CLASSES:  # a KeyError, before
        fix = f"its {INFO} names no task of {sorted(MODEL_CLASSES)} (damaged, or not written by pm_hf): export again."
        raise invalid("model", str(source), fix)
    if info.get("format") == "merged":
        model = MODEL_CLASSES[task].from_pretrained(str(folder))
    else:
        model = load_adapter_export(folder, task).merge_and_unload()
    auto = AutoImageProcessor if task == "image_classification" else AutoTokenizer
    return model, auto.from_pretrained(str(folder)), info


def load_adapter_export(folder: str | Path, task: str) -> PeftModel:
    """The PEFT adapter in `folder` on its base model, as `AutoPeftModelFor...` of `task` loads it, except that a
    `base_model_name_or_path` relative to the folder (a classifier export's own `base/`) is resolved against the
    folder, where PEFT would resolve it against the working directory."""
    config = PeftConfig.from_pretrained(str(folder))
    base = resolve_base(folder, config.base_model_name_or_path)
    model = MODEL_CLASSES[task].from_pretrained(base, revision=config.revision)
    return PeftModel.from_pretrained(model, str(folder))


def _fits(stream, model) -> None:
    """A classifier scores only the classes its head has: a data config of more would be scored by rows the head
    grows at random."""
    labels = getattr(model.config, "num_labels", None) if stream.modality != "instruction" else None
    if labels is not None and stream.num_classes > labels:
        fix = f"the data config's tasks hold {stream.num_classes} classes, more than the model's head scores"
        raise invalid("num_labels", labels, fix + ": give a data config of the classes the model was trained on.")


def evaluate_export(source: str, parsed: RunConfig | tuple, revision: str | None = None) -> dict:
    """Score an export folder or Hub model on every task of a data config (`parsed`: its `RunConfig`, or the six
    argument groups of `pm_hf.commands.parsing.parse_config`). Returns {"tasks", "last_row", "acc", "info"}."""
    model, processor, info = load_export(source, revision)
    run = RunConfig.of(parsed)
    model_args = dataclasses.replace(run.model_args, model_name_or_path=source, revision=revision)
    with tempfile.TemporaryDirectory() as tmp:
        quiet = {k: v for k, v in QUIET.items() if k != "hub_token"}
        args = dataclasses.replace(run.training_args, output_dir=tmp, **quiet)
        run = run.replace(model_args=model_args, training_args=args)
        loop = build_loop(run, model=model, processor=processor, check_stream=lambda stream, _: _fits(stream, model))
    tasks = loop.stream.tasks
    row = loop.evaluator.evaluate_seen(tasks)[loop.evaluator.primary]
    names = [task.name for task in tasks]
    return {"tasks": names, "last_row": row, "acc": seen_accuracy(row, [len(t.eval) for t in tasks]), "info": info}
