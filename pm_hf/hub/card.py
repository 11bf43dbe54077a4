"""The model card of an export folder (`README.md`), built with `huggingface_hub`'s `ModelCard`/`ModelCardData`, one
kind per output: an adapter export gets a PEFT card (`library_name: peft`, loaded on its base), a merged export a
Transformers card (`library_name: transformers`, loaded with `pipeline` or `AutoModelFor...`), a post-hoc merge
(`pm-hf merge`) a card naming the merge rule and the adapters it merged. Metadata: the base model's Hub id (only when
it came from the Hub; a local base is named in the text) and licence (from its own card, where a copy is at hand),
the Hub datasets of the run, and a model-index of ACC and AAA (the primary metric) and BWT and forgetting (typed as
such) when the export was evaluated. The text: the task
sequence and alpha per task, the score matrix and the plots present in the folder, the key settings (none unset),
how to load it, the framework versions and the paper's citation. Every number comes from results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from .card_text import PIPELINES, SUMMARY, alpha_table, body, is_posthoc, matrix_table, task_body

__all__ = ["alpha_table", "base_license", "card_data", "matrix_table", "write_card", "write_task_card"]

LOCAL_BUILDERS = {"parquet", "csv", "json", "text", "arrow", "imagefolder", "audiofolder", None}


def datasets_of(config: dict) -> list[str]:
    """Hub dataset ids of the run (local files are not datasets of the Hub)."""
    data = config.get("DataArguments", {})
    names = [data.get("dataset_name")] + [t.get("dataset_name") for t in data.get("task_datasets") or []]
    return sorted({n for n in names if n not in LOCAL_BUILDERS})


def base_license(info: dict) -> dict:
    """The licence fields (`license`, and `license_name`/`license_link` for an 'other' one) of the base model's own
    card, read from a local copy only: the base's folder, or its snapshot in the HF cache. A fine-tuned model keeps
    its base's terms; where no card of the base is at hand, none is claimed ({})."""
    hub_id, local = info.get("hub_id"), info.get("base_model")
    if isinstance(local, str) and not hub_id and Path(local).is_dir():
        readme = Path(local) / "README.md"
    elif isinstance(hub_id, str) and hub_id:
        try:  # the Hub's cache only (no download): a base gone from it, or a revision not cached, claims nothing
            found = try_to_load_from_cache(hub_id, "README.md", revision=info.get("revision"))
        except ValueError:  # an id or revision the cache cannot name (HFValidationError)
            found = None
        readme = Path(found) if isinstance(found, str) else None
    else:
        return {}
    if readme is None or not readme.is_file():
        return {}
    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError):
        return {}
    return {key: data[key] for key in ("license", "license_name", "license_link") if data.get(key)}


def _evals(results: dict, info: dict, datasets: list[str]) -> list[EvalResult]:
    """The model-index: the summary scores (fractions, as results.json has them) of an evaluated export; none for a
    merge without data. An SVD export has only its own ACC (`score_after`): the run's other scores are of its exact
    model."""
    if not results.get("accuracy_matrix"):
        return []
    task, metric = info.get("task", "sequence_classification"), results.get("primary_metric", "accuracy")
    where = datasets[0] if len(datasets) == 1 else "continual"
    values = {name: results.get(key) for name, key, _ in SUMMARY}
    if info.get("mode") == "adapter-svd":
        values = {"ACC": info.get("score_after")}
    return [
        EvalResult(task_type=PIPELINES[task], dataset_type=where, dataset_name=f"{len(results['tasks'])}-task sequence",
                   metric_type=kind or metric, metric_name=name, metric_value=round(values[name], 6))
        for name, _, kind in SUMMARY if values.get(name) is not None and math.isfinite(values[name])
    ]  # fmt: skip


def card_data(results: dict, info: dict, repo_id: str | None) -> ModelCardData:
    task, merged = info.get("task", "sequence_classification"), info.get("format") == "merged"
    datasets = datasets_of(results.get("config", {}))
    method = info.get("merge_method") or results.get("config", {}).get("MergeArguments", {}).get("merge_method")
    tags = ["continual-learning", "pm_hf", "lora"] + ([] if merged else ["peft"])
    tags += ["perturb-and-merge"] if _perturbed(method, results) and not is_posthoc(info) else []
    tags += ["model-merging"] if is_posthoc(info) else []
    evals = _evals(results, info, datasets)
    return ModelCardData(
        **base_license(info),
        base_model=info.get("hub_id") or None,
        library_name="transformers" if merged else "peft",
        pipeline_tag=PIPELINES[task],
        tags=tags,
        datasets=datasets or None,
        eval_results=evals or None,
        model_name=(repo_id or "pm_hf continual model") if evals else None,  # the model-index's name
    )


def _perturbed(method: str | None, results: dict) -> bool:
    """P&M's own rule, or any rule over tasks trained with its perturbation (the preset's `validated-alpha`)."""
    config = results.get("config", {}).get("PMConfig", {})
    return method == "pm" or (config.get("perturbation", "none") != "none" and bool(config.get("perturb_eps")))


def write_card(folder: Path, results: dict, repo_id: str | None = None) -> ModelCard:
    """Write `folder/README.md` from results.json's content and the folder's pm_hf_export.json (the plots it links
    are those present in the folder)."""
    folder = Path(folder)
    info = json.loads((folder / "pm_hf_export.json").read_text())
    text = body(results, info, repo_id, folder)
    card = ModelCard(f"---\n{card_data(results, info, repo_id).to_yaml()}\n---\n{text}")
    card.save(folder / "README.md")
    return card


def write_task_card(folder: Path) -> ModelCard:
    """Write the card of one task's adapter (`pm-hf export --mode per-task`) from its pm_hf_export.json."""
    folder = Path(folder)
    info = json.loads((folder / "pm_hf_export.json").read_text())
    data = ModelCardData(**base_license(info), base_model=info.get("hub_id") or None, library_name="peft",
                         pipeline_tag=PIPELINES[info.get("task", "causal_lm")],
                         tags=["continual-learning", "pm_hf", "lora", "peft"])  # fmt: skip
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{task_body(info, folder)}")
    card.save(folder / "README.md")
    return card
