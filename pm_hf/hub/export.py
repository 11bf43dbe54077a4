"""Export of the merged model as one PEFT adapter, and the per-task records it is built from.

Each task merged as theta_hat_{t-1} + alpha_t * s_t B_t A_t leaves a `TaskRecord` (alpha_t, A_t, B_t, s_t), written once
to `adapters/task_<t>.safetensors` (an append-only log, never held in memory). The merged delta sum_t alpha_t s_t
B_t A_t is then exactly one LoRA adapter of rank sum_t r_t. Strategies whose merged delta is not of that form
(per-parameter weights, deltas from theta_0) export theta_hat - theta_0 of each adapted weight, factored exactly by
SVD.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config.checks import check_finite
from ..fileio import atomic_dir, atomic_write
from ..method.adapters import lora_layers, set_lora_factors, strip_prefix
from ..method.merge import LoraFactors
from ..method.models import quiet_loading
from .card import write_card, write_task_card
from .origin import base_reference, framework_versions, hub_origin

logger = logging.getLogger(__name__)
ADAPTERS_DIR = "adapters"
EXPORT_DIR = "merged_adapter"


@dataclass
class TaskRecord:
    """One task's adapter, enough to rebuild its merged contribution alpha * s * B @ A exactly."""

    alpha: dict[str, float]
    scaling: dict[str, float]
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    fan_in_fan_out: bool


def task_record(factors: Mapping[str, LoraFactors], alpha: Mapping[str, float]) -> TaskRecord:
    """The record of a task merged with `alpha` (one float per LoRA key) from its trained adapter's factors."""
    rec = TaskRecord({}, {}, {}, {}, False)
    for key, f in factors.items():
        rec.alpha[key], rec.scaling[key] = float(alpha[key]), float(f.scaling)
        rec.A[key], rec.B[key] = f.A, f.B
        rec.fan_in_fan_out = f.fan_in_fan_out
    return rec


def history_delta(history: list[TaskRecord]) -> dict[str, torch.Tensor]:
    """sum_i alpha_i * s_i * B_i @ A_i per LoRA key, in the base weight's layout (fp32)."""
    total: dict[str, torch.Tensor] = {}
    for rec in history:
        for key in rec.A:
            d = rec.alpha[key] * rec.scaling[key] * (rec.B[key] @ rec.A[key])
            d = d.T if rec.fan_in_fan_out else d
            total[key] = total[key] + d if key in total else d
    return total


def save_task_record(out_dir: Path, t: int, rec: TaskRecord) -> Path:
    """Write task t's record once (atomically) to `out_dir/adapters/task_<t>.safetensors`."""
    tensors = {f"A/{k}": v.contiguous() for k, v in rec.A.items()}
    tensors.update({f"B/{k}": v.contiguous() for k, v in rec.B.items()})
    check_finite(tensors, f"the adapter record of task {t}")
    meta = {
        "alpha": json.dumps(rec.alpha),
        "scaling": json.dumps(rec.scaling),
        "fan_in_fan_out": str(rec.fan_in_fan_out),
    }
    path = Path(out_dir) / ADAPTERS_DIR / f"task_{t}.safetensors"
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def copy_task_records(src: Path, dst: Path, count: int) -> None:
    """The records of tasks 0..count-1 of the run in `src`, into the run folder `dst` (those that exist)."""
    for t in range(count):
        path = Path(src) / ADAPTERS_DIR / f"task_{t}.safetensors"
        if path.exists():
            atomic_write(Path(dst) / ADAPTERS_DIR / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))


def has_task_records(out_dir: Path, count: int) -> bool:
    return all((Path(out_dir) / ADAPTERS_DIR / f"task_{t}.safetensors").exists() for t in range(count))


def record_digest(rec: TaskRecord) -> str:
    """sha256 of a record's content (its factors' keys, dtypes, shapes and values, alpha, scaling and layout), the
    same for the record in memory and read back from its file: the run's log keeps it, an export checks it."""
    digest = hashlib.sha256(json.dumps([rec.alpha, rec.scaling, rec.fan_in_fan_out], sort_keys=True).encode())
    for part, factors in (("A", rec.A), ("B", rec.B)):
        for key in sorted(factors):
            value = factors[key].detach().cpu().contiguous()
            digest.update(f"{part}/{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def load_task_records(out_dir: Path, count: int, digests: Sequence[str | None] = ()) -> list[TaskRecord]:
    """The records of tasks 0..count-1 (files of tasks not yet completed are ignored), each checked against its
    digest in `digests` where the run's log gives one (ValueError: a missing, unreadable or changed record)."""
    records = []
    for t in range(count):
        path = Path(out_dir) / ADAPTERS_DIR / f"task_{t}.safetensors"
        if not path.exists():
            raise ValueError(
                f"{path} is missing: the run's adapter log is incomplete, so it cannot be exported exactly."
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            fan = meta["fan_in_fan_out"] == "True"
            alpha, scaling = json.loads(meta["alpha"]), json.loads(meta["scaling"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise ValueError(f"{path} cannot be read ({err}): the run's adapter log is damaged.") from err
        A = {k[2:]: v for k, v in tensors.items() if k.startswith("A/")}
        B = {k[2:]: v for k, v in tensors.items() if k.startswith("B/")}
        records.append(TaskRecord(alpha, scaling, A, B, fan))
        if t < len(digests) and digests[t] is not None and record_digest(records[-1]) != digests[t]:
            raise ValueError(f"{path} is not the record the run wrote for task {t} (its sha256 is not the log's).")
    return records


def merged_record(weights, fan_in_fan_out: bool) -> TaskRecord:
    """A merged adapter's factors (`pm_hf.method.weights.LowRankWeights`) as one exact record (alpha = scaling = 1)."""
    rec = TaskRecord({}, {}, {}, {}, fan_in_fan_out)
    for key, (A, B) in weights.factors.items():
        rec.A[key], rec.B[key], rec.alpha[key], rec.scaling[key] = A.cpu(), B.cpu(), 1.0, 1.0
    return rec


def dense_record(deltas: Mapping[str, torch.Tensor], fan_in_fan_out: bool = False) -> TaskRecord:
    """A `TaskRecord` whose factors reproduce dense deltas (base-weight layout) exactly: B = U diag(S), A = V^T from the
    SVD, zero-padded to one common rank (the largest min(out, in)); alpha = scaling = 1."""
    rank = max(min(d.shape) for d in deltas.values())
    rec = TaskRecord({}, {}, {}, {}, fan_in_fan_out)
    for key, delta in deltas.items():
        d = delta.double().T if fan_in_fan_out else delta.double()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = S.shape[0]
        B = torch.zeros(d.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, d.shape[1], dtype=torch.float64)
        B[:, :k], A[:k] = U * S, Vh
        rec.A[key], rec.B[key] = A.float(), B.float()
        rec.alpha[key], rec.scaling[key] = 1.0, 1.0
    return rec


TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "image_classification": None}
BASE_DIR = "base"  # classifiers: the pretrained model with a head of the run's classes, which the adapter loads on
INFO = "pm_hf_export.json"


@dataclass
class ExportSpec:
    """What makes an export folder self-describing."""

    base_model: str  # the pretrained model's Hub id or folder
    revision: str | None
    task: str  # "sequence_classification", "image_classification" or "causal_lm"
    save_modules: list[str]
    processor: object | None = None  # the tokenizer or image processor, saved beside the adapter
    info: dict | None = None  # anything else to record in pm_hf_export.json (run, strategy, alphas, ...)


def svd_record(deltas: Mapping[str, torch.Tensor], rank: int, fan_in_fan_out: bool) -> tuple[TaskRecord, dict]:
    """A rank-`rank` record of dense deltas (the best approximation in Frobenius norm, by SVD) and each module's
    relative reconstruction error ||Delta - Delta_K|| / ||Delta||."""
    rec, errors = TaskRecord({}, {}, {}, {}, fan_in_fan_out), {}
    for key, delta in deltas.items():
        d = delta.double().T if fan_in_fan_out else delta.double()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        k = min(rank, S.shape[0])
        B = torch.zeros(d.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, d.shape[1], dtype=torch.float64)
        B[:, :k], A[:k] = U[:, :k] * S[:k], Vh[:k]
        rec.A[key], rec.B[key], rec.alpha[key], rec.scaling[key] = A.float(), B.float(), 1.0, 1.0
        total = float(S.square().sum())
        errors[key] = (float(S[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return rec, errors


def write_export(base_model: nn.Module, history: list[TaskRecord], full_params: Mapping[str, torch.Tensor],
                 spec: ExportSpec, out_dir: Path, merged: bool = False, results: dict | None = None,
                 plots: Sequence[Path] = (), base_ref: tuple[str, str] | None = None) -> Path:  # fmt: skip
    """Write a self-describing export folder atomically: the adapter (or, `merged`, the full merged model), the
    tokenizer or image processor, `pm_hf_export.json`, and for classifiers the pretrained base with a head of the
    run's classes under `base/`, which `adapter_config.json` names relative to the folder (`"base"`), so the folder
    loads wherever it is moved or copied with `pm_hf.load_export` (or PEFT on `base/`, see `pm_hf.run.runs`); a causal
    LM's adapter names its base by Hub id (or absolute local path), so `AutoPeftModelForCausalLM` loads it alone; a
    merged export is a plain `AutoModelFor...` folder. `base_ref` (repo id, revision) names where `base/` is pushed,
    for a folder bound for the Hub (which `AutoPeftModelFor...` then loads by id)."""
    out_dir = Path(out_dir)
    classifier = spec.task != "causal_lm"
    with atomic_dir(out_dir) as tmp, quiet_loading():
        if classifier and not merged:
            base_model.save_pretrained(tmp / BASE_DIR)  # before LoRA is attached: the pristine base
        model = export_merged_adapter(base_model, history, full_params, spec.save_modules, str(tmp), spec.task)
        if merged:
            _clear_adapter_files(tmp)
            model.merge_and_unload().save_pretrained(tmp)
        else:  # the base by Hub id, or `base/` relative to this folder: the folder loads wherever it is copied
            own = base_ref or (BASE_DIR, None)
            _point_adapter_at(tmp, *(own if classifier else base_reference(spec.base_model, spec.revision)))
        if spec.processor is not None:
            save_processor(spec.processor, tmp)
        info = {**export_info(spec), **(spec.info or {}), "format": "merged" if merged else "adapter"}
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        for plot in plots:
            if Path(plot).is_file():
                shutil.copyfile(plot, tmp / Path(plot).name)
        if results is not None:
            (tmp / "results.json").write_text(json.dumps(results, indent=1, default=float))
            write_card(tmp, results, info.get("repo_id"))
    return out_dir


def write_task_adapters(base_model: nn.Module, history: list[TaskRecord], spec: ExportSpec, out_dir: Path) -> Path:
    """Each task's trained adapter as its own PEFT adapter with its card, `out_dir/task_<t>` (factors as trained,
    before any alpha; LoRA layers only: the log keeps no head per task), for `pm-hf merge` or other tools."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, quiet_loading():
        for t, rec in enumerate(history):
            keys = list(rec.A)
            rank, scaling = rec.A[keys[0]].shape[0], {rec.scaling[k] for k in keys}
            if len(scaling) != 1:
                raise ValueError(f"task {t}: LoRA scalings {sorted(scaling)} differ between layers.")
            config = LoraConfig(r=rank, lora_alpha=scaling.pop() * rank, fan_in_fan_out=rec.fan_in_fan_out,
                                target_modules=sorted({k[: -len(".weight")] for k in keys}),
                                task_type=TASK_TYPES.get(spec.task))  # fmt: skip
            model = get_peft_model(copy.deepcopy(base_model), config)
            set_lora_factors(model, rec.A, rec.B, "default")
            model.save_pretrained(tmp / f"task_{t}", save_embedding_layers=False)
            _point_adapter_at(tmp / f"task_{t}", *base_reference(spec.base_model, spec.revision))
            names = (spec.info or {}).get("tasks") or []
            info = {**export_info(spec), "format": "adapter", "per_task": t, "alpha_used": rec.alpha}
            info["task_name"] = names[t] if t < len(names) else None
            (tmp / f"task_{t}" / INFO).write_text(json.dumps(info, indent=1))
            if spec.processor is not None:
                save_processor(spec.processor, tmp / f"task_{t}")
            write_task_card(tmp / f"task_{t}")
    return out_dir


def export_info(spec: ExportSpec) -> dict:
    """What pm_hf_export.json records of the base (its Hub id or absolute local path, `hub_id` None for a local
    model, and the revision), the task and the framework versions the export was written with."""
    base, revision = base_reference(spec.base_model, spec.revision)
    hub_id = base if hub_origin(spec.base_model) else None
    return {"base_model": base, "hub_id": hub_id, "revision": revision, "task": spec.task,
            "versions": framework_versions()}  # fmt: skip


def _clear_adapter_files(folder: Path) -> None:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).unlink(missing_ok=True)


def _point_adapter_at(folder: Path, base: str, revision: str | None) -> None:
    """Set the base model (and its revision) that `adapter_config.json` loads the adapter on; its module lists are
    written sorted and without repeats (PEFT writes a set in the process's hash order), so the same adapter gives the
    same bytes in any process (a push made again is then no change)."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(base_model_name_or_path=base, revision=revision)
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(set(config[key]))
    path.write_text(json.dumps(config, indent=2))


def save_processor(processor, folder: Path) -> None:
    """Save the tokenizer or image processor as it was loaded: a fast tokenizer's truncation and padding, which
    its last call leaves set (or not, when the data came from the datasets cache), are not saved with it."""
    backend = getattr(processor, "_tokenizer", None)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        processor = copy.deepcopy(processor)
        processor._tokenizer.no_truncation()
        processor._tokenizer.no_padding()
    processor.save_pretrained(folder)


def export_merged_adapter(
    base_model: nn.Module,
    history: list[TaskRecord],
    full_params: Mapping[str, torch.Tensor],
    save_modules: list[str],
    out_dir: str,
    task: str | None = None,
) -> PeftModel:
    """Save sum_i alpha_i s_i B_i A_i as ONE PEFT LoRA adapter of rank sum_i r_i (exact: B = [alpha_i s_i B_i],
    A = [A_i], scaling 1), with the merged fully trained modules (head, pooler) as `modules_to_save`; `task` (e.g.
    "sequence_classification") sets PEFT's task type.

    Args:
        base_model: a pristine copy of the pretrained model (same architecture and head size).
        history: the per-task records.
        full_params: merged values of the fully trained parameters, by merge key.
        save_modules: module names for `modules_to_save` (they must own every key of `full_params`).
        out_dir: where `save_pretrained` writes; `PeftModel.from_pretrained(base, out_dir)` loads it.
    """
    if not history:
        raise ValueError("the history is empty: train at least one task before exporting.")
    keys = list(history[0].A)
    rank = sum(rec.A[keys[0]].shape[0] for rec in history)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted({k[: -len(".weight")] for k in keys}),
        modules_to_save=list(save_modules) or None,  # a copy: PEFT extends it with the task's head names
        fan_in_fan_out=history[0].fan_in_fan_out,
        init_lora_weights=False,
        task_type=TASK_TYPES.get(task),
    )
    model = get_peft_model(base_model, config)
    if set(lora_layers(model)) != set(keys):
        raise ValueError(f"the base model's LoRA layers {sorted(lora_layers(model))[:3]}... differ from the history's.")
    A = {k: torch.cat([rec.A[k] for rec in history], 0) for k in keys}
    B = {k: torch.cat([rec.alpha[k] * rec.scaling[k] * rec.B[k] for rec in history], 1) for k in keys}
    for what, tensors in (("A", A), ("B", B), ("modules_to_save", full_params)):
        check_finite(tensors, f"the exported adapter ({what})")
    set_lora_factors(model, A, B, "default")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in full_params.items():
            matches = [n for n in params if _wrapped_name(n, key)]
            if len(matches) != 1:
                raise ValueError(f"fully trained parameter {key!r} is not covered by `modules_to_save`={save_modules}.")
            params[matches[0]].copy_(value)
    model.save_pretrained(out_dir, save_embedding_layers=False)
    return model


def _wrapped_name(param_name: str, key: str) -> bool:
    """Whether `param_name` is the modules_to_save copy of merge key `key` (wrapper inserted at any depth)."""
    parts = strip_prefix(param_name).split(".")
    if "modules_to_save" not in parts:
        return False
    i = parts.index("modules_to_save")
    return ".".join(parts[:i] + parts[i + 2 :]) == key


def task_records(out_dir: Path, completed: int, digests: Sequence[str | None] = ()) -> list[TaskRecord] | None:
    """The per-task records of a run's completed tasks, each as the run wrote it; None (with a warning naming why
    where a record is there but damaged) when any is missing or not the one its log names."""
    if not has_task_records(out_dir, completed):
        return None
    try:
        return load_task_records(out_dir, completed, digests)
    except ValueError as err:
        logger.warning("%s The export is factored from the merged weights instead (exact, one SVD per layer).", err)
        return None


def run_history(out_dir: Path, completed: int, theta0: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
                fan_in_fan_out: bool = False, records: list[TaskRecord] | None = None) -> list[TaskRecord]:  # fmt: skip
    """The merged delta of a run as records: the per-task records (`task_records`) when every task left one as the
    run wrote it (exact, rank sum(r)), else theta_hat - theta_0 of each adapted weight factored exactly by SVD."""
    if records is not None:
        return records
    return [dense_record({k: v.float() - theta0[k].float() for k, v in merged.items()}, fan_in_fan_out)]
