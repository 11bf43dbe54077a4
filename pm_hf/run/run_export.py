"""A run's model written out and pushed: the export folder of the merged model (`pm-hf export`, the end of a run),
the push after a task or at the end (`hub_strategy`), and the score change of a compressed export. Functions of a
finished or running `ContinualLoop` (`loop`), called by the loop after a task and at the end, and by the commands.

A push is made once: its pm_hf_export.json names the checkpoint state it was made from (`pushed_state`), so a push
interrupted by a kill or a full disk and made again (`pm-hf push` rerun, a resumed run: `push_missing`) finds its
commit if it landed (then only the tag is made) and commits otherwise; the Hub makes each commit whole or not at
all."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..config.checks import invalid
from ..distributed.loading import loading_whole
from ..hub.export import (
    EXPORT_DIR,
    INFO,
    ExportSpec,
    history_delta,
    merged_record,
    run_history,
    svd_record,
    task_records,
    write_export,
    write_task_adapters,
)
from ..hub.repository import BASE_BRANCH, HUB_ERRORS, STATE_DIR, HubTarget, push_run, sequence_differences
from ..method.adapters import base_weights, uses_fan_in_fan_out
from .checkpoint import LATEST, MANIFEST, STATE, seeded, state_files


def export_spec(loop, info: dict | None = None) -> ExportSpec:
    """How this run's model is described in an export folder."""
    model_args = loop.run_config.model_args  # as loaded (a saved run's relative path made absolute where it ran)
    task = {"text": "sequence_classification", "image": "image_classification"}.get(loop.stream.modality)
    info = {"merge_method": loop.strategy.name, "tasks": [e["task"] for e in loop.log],
            "alphas": [e["alpha"] for e in loop.log], **(info or {})}  # fmt: skip
    base = model_args.model_name_or_path or ""
    return ExportSpec(base, model_args.revision, task or "causal_lm", loop.save_modules, loop.processor, info)


def export_run(loop, out: Path | None = None, mode: str = "adapter", rank: int | None = None, info: dict | None = None,
               base_ref: tuple[str, str] | None = None, whole: tuple[dict, dict] | None = None) -> dict:  # fmt: skip
    """Write the merged model as a self-describing folder (default output_dir/merged_adapter), see
    `pm_hf.hub.export.write_export`: mode 'adapter' (exact, rank sum(r)), 'adapter-svd' (rank `rank`, with each
    module's relative reconstruction error and the accuracy change) or 'merged' (a full model). `info` is added
    to pm_hf_export.json, `base_ref` names a Hub base (see `pm_hf.hub.repository`). Returns what pm_hf_export.json
    records."""
    with seeded(loop.args.seed), loading_whole():  # the main process alone: never partitioned by ZeRO-3
        base = loop.load_base()
    if loop.stream.label_names and hasattr(base.config, "id2label"):  # a wider head's other rows keep their names
        rows = max(len(loop.stream.label_names), getattr(base.config, "num_labels", 0))
        names = [
            *loop.stream.label_names,
            *(base.config.id2label.get(i, f"LABEL_{i}") for i in range(len(loop.stream.label_names), rows)),
        ]
        base.config.id2label = dict(enumerate(names))
        base.config.label2id = {n: i for i, n in enumerate(names)}
    theta0 = {k: p.detach().float().clone() for k, p in base.named_parameters()}
    merged, full = whole or loop.weights.gathered()
    fan = uses_fan_in_fan_out(loop.model)
    needed = not loop.low_rank or mode == "per-task"  # a run merged into an adapter exports that adapter otherwise
    digests = [entry.get("record_sha256") for entry in loop.log]  # each record checked against its log entry's
    records = task_records(loop.out, len(loop.log), digests) if needed else None
    if loop.low_rank:  # the run's model is the base plus its merged adapter (compressed or not)
        history = [merged_record(loop.weights, fan)]
        if mode not in ("adapter", "per-task"):
            raise invalid("mode", mode, "a run with a merged adapter exports it as it is: use 'adapter'.")
    else:
        history = run_history(loop.out, len(loop.log), theta0, merged, fan, records)
    info = {**(info or {}), "mode": mode}
    out = out or loop.out / EXPORT_DIR
    if mode == "per-task":
        if loop.stream.modality != "instruction" or records is None:
            fix = "needs a causal LM run of a low-rank strategy (a classifier's head per task is not logged)."
            fix += " Its adapter log (adapters/) must be whole, as the run wrote it." if records is None else ""
            raise invalid("mode", mode, fix)
        spec = export_spec(loop)
        write_task_adapters(base, records, spec, out)  # each task's own, also where the run's model holds one adapter
        return {"mode": mode, "tasks": spec.info["tasks"], "base_model": spec.base_model}
    if mode == "adapter-svd":
        deltas = history_delta(history)
        full_rank = max(min(delta.shape) for delta in deltas.values())
        if rank > full_rank:  # zero columns beyond it: a larger file, the same model
            fix = f"at most {full_rank}, the adapted layers' full rank (`--mode adapter` is exact at rank sum(r))."
            raise invalid("rank", rank, fix)
        record, errors = svd_record(deltas, rank, fan)
        history = [record]
        info.update(rank=rank, relative_error=errors, **score_change(loop, theta0, record))
    elif mode not in ("adapter", "merged"):
        raise invalid("mode", mode, "use 'adapter', 'adapter-svd', 'merged' or 'per-task'.")
    spec = export_spec(loop, info)
    plots = [loop.out / "accuracy_matrix.png", loop.out / "accuracy_curve.png"]
    write_export(base, history, full, spec, out, mode == "merged", loop.results(), plots, base_ref)
    return {**spec.info, "base_model": spec.base_model}


def push_task(loop, t: int, whole: tuple[dict, dict] | None = None, again: bool = False) -> str:
    """Push the model after task t to `loop.hub` (see `pm_hf.hub.repository`): the export with its card and plots, with
    `push_continual_state` the state a later run continues from, tagged `task-<t+1>` with hub_strategy
    every_task. The single push of hub_strategy end, and any push made `again` (after an interruption), first looks
    for its own commit on the branch (`pushed_commit`) and makes none when it is there. Returns the commit id."""
    every = loop.args.hub_strategy == "every_task"
    entry, total, tag = loop.log[t], len(loop.stream.tasks), f"task-{t + 1}" if every else None
    key = push_key(loop, t)
    config = json.loads(json.dumps(loop.results()["config"], default=float))  # as results.json holds it
    found = pushed_commit(loop.hub, tag, key, config) if again or not every else None
    if found is not None:
        if tag is not None:
            move_tag(loop.hub, tag, found)
        return found
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        info = {"repo_id": loop.hub.repo_id, "tagged": every, "pushed_state": key}
        export_run(loop, folder, info=info, base_ref=(loop.hub.repo_id, BASE_BRANCH), whole=whole)
        state = state_files(loop.out) if loop.args.push_continual_state else None
        message = f"pm_hf: after task {t + 1}/{total} ({entry['task']}), alpha {entry['alpha']:.4f}"
        return push_run(loop.hub, folder, state, message, tag)


def push_missing(loop) -> str | None:
    """After a resume, the push a kill or a full disk stopped: with hub_strategy every_task the last completed task's,
    with end the final one of a finished sequence; made only if the branch lacks it (`push_task(again=True)`).
    Every rank calls it (the merged weights are gathered to the pushing one). Returns the commit id, or None."""
    a, done, total = loop.args, len(loop.log), len(loop.stream.tasks)
    if not a.push_to_hub or not done or (a.hub_strategy != "every_task" and done < total):
        return None
    whole = loop.weights.gathered(a.should_save)
    if not a.should_save or loop.hub is None:
        return None
    return push_task(loop, done - 1, whole, again=True)


def push_key(loop, t: int) -> dict:
    """What names task t's push: the task, the sha256 of the checkpoint state after it (its manifest's) and whether
    the continual state goes with it."""
    name = json.loads((loop.out / LATEST).read_text())["checkpoint"]
    digest = json.loads((loop.out / name / MANIFEST).read_text())["sha256"][STATE]
    return {"task": t + 1, "state_sha256": digest, "continual_state": bool(loop.args.push_continual_state)}


def pushed_commit(target: HubTarget, tag: str | None, key: dict, config: dict) -> str | None:
    """The branch's head when it is this push (a kill after the commit, before the tag or the end): `tag` already on
    it, or its pm_hf_export.json naming `key` with the continual state, if any, of this run's sequence (`config`; a
    commit made on top of the push with another sequence's state is not it); else None (nothing of it landed: a
    commit is whole or absent)."""
    try:
        head = target.api.repo_info(target.repo_id, revision=target.revision).sha
    except HUB_ERRORS:  # a branch not made yet
        return None
    if head is None:
        return None
    if tag is not None and _tags(target).get(tag) == head:
        return head
    state = f"{STATE_DIR}/results.json"
    try:
        folder = Path(target.api.snapshot_download(target.repo_id, revision=head, allow_patterns=[INFO, state]))
        pushed = json.loads((folder / INFO).read_text()).get("pushed_state")
        theirs = json.loads((folder / state).read_text()).get("config") if (folder / state).is_file() else config
    except HUB_ERRORS:  # no pm_hf export there (OSError), or not one of its JSON (ValueError)
        return None
    return head if pushed == key and not sequence_differences(theirs, config) else None


def move_tag(target: HubTarget, tag: str, oid: str) -> None:
    """Point `tag` at `oid` (made, or moved from an older commit)."""
    tags = _tags(target)
    if tags.get(tag) == oid:
        return
    if tag in tags:
        target.api.delete_tag(target.repo_id, tag=tag)
    target.api.create_tag(target.repo_id, tag=tag, revision=oid)


def _tags(target: HubTarget) -> dict[str, str]:
    return {ref.name: ref.target_commit for ref in target.api.list_repo_refs(target.repo_id).tags}


def score_change(loop, theta0: dict, record) -> dict:
    """The primary score over all trained tasks with the adapted weights replaced by theta_0 + the record's delta
    (then put back exactly)."""
    saved = {k: loop.weights.value(k, w).float().clone() for k, w in base_weights(loop.model).items()}
    tasks = loop.stream.tasks[: len(loop.log)]
    before = loop.evaluator.seen_score(tasks)
    deltas = history_delta([record])
    loop.weights.apply(deltas, dict.fromkeys(deltas, 1.0), base=theta0)
    try:
        after = loop.evaluator.seen_score(tasks)
    finally:
        loop.weights.restore(saved)
    return {"score_before": before, "score_after": after, "score_change": after - before}
