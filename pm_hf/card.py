"""The model card of an export folder (`README.md`), built with `huggingface_hub`'s `ModelCard`/`ModelCardData`:
metadata (base model, library, pipeline tag, tags, datasets, a model-index with ACC, AAA, BWT and forgetting), the
task sequence, alpha per task, the accuracy matrix as a table and as the heatmap image, the method and its key
config, how to load the model, and the paper's citation. Every number comes from results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PIPELINES = {"sequence_classification": "text-classification", "image_classification": "image-classification",
             "causal_lm": "text-generation"}  # fmt: skip
LOADERS = {"sequence_classification": "AutoPeftModelForSequenceClassification", "causal_lm": "AutoPeftModelForCausalLM",
           "image_classification": "AutoPeftModel"}  # fmt: skip
CITATION = """@inproceedings{qiu2025perturbmerge,
  title     = {Train with Perturbation, Infer after Merging: A Two-Stage Framework for Continual Learning},
  author    = {Qiu, Haomiao and Zhang, Miao and Qiao, Ziyue and Nie, Liqiang},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  url       = {https://arxiv.org/abs/2505.22389}
}"""
SUMMARY = (("ACC", "acc"), ("AAA", "aaa"), ("BWT", "bwt"), ("forgetting", "forgetting"))


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


def _datasets(config: dict) -> list[str]:
    """Hub dataset ids of the run (local files are not datasets of the Hub)."""
    data = config.get("DataArguments", {})
    names = [data.get("dataset_name")] + [t.get("dataset_name") for t in data.get("task_datasets") or []]
    local = {"parquet", "csv", "json", "text", "arrow", "imagefolder", "audiofolder", None}
    return sorted({n for n in names if n not in local})


def card_data(results: dict, info: dict, repo_id: str | None) -> ModelCardData:
    task = info.get("task", "sequence_classification")
    metric = results.get("primary_metric", "accuracy")
    evals = [
        EvalResult(task_type=PIPELINES[task], dataset_type="continual", dataset_name="task sequence",
                   metric_type=metric, metric_name=name, metric_value=round(100 * results[key], 4))
        for name, key in SUMMARY if results.get(key) is not None
    ]  # fmt: skip
    return ModelCardData(
        base_model=info.get("base_model") or None,
        library_name="peft",
        pipeline_tag=PIPELINES[task],
        tags=["continual-learning", "pm_hf", "perturb-and-merge", "lora", "peft"],
        datasets=_datasets(results.get("config", {})) or None,
        eval_results=evals or None,
        model_name=repo_id or "pm_hf continual model",
    )


def matrix_table(results: dict) -> str:
    """R[t][j] of results.json as a markdown table (percent)."""
    tasks, R = results["tasks"], results["accuracy_matrix"]
    head = "| after task | " + " | ".join(f"{j + 1}. {n.split(': ', 1)[-1]}" for j, n in enumerate(tasks)) + " |"
    rows = [f"| {t + 1} | " + " | ".join(_pct(v) for v in row) + " |" for t, row in enumerate(R)]
    return "\n".join([head, "|---" * (len(tasks) + 1) + "|", *rows])


def alpha_table(results: dict) -> str:
    """alpha per task (used and raw) as a markdown table."""
    rows = ["| task | α used | α raw |", "|---|---|---|"]
    for t, (a, raw) in enumerate(zip(results["alphas"], results["alphas_raw"])):
        rows.append(f"| {t + 1}. {results['tasks'][t]} | {a:.4f} | {raw:.4f} |")
    return "\n".join(rows)


def _body(results: dict, info: dict, repo_id: str | None) -> str:
    task, where = info.get("task", "sequence_classification"), repo_id or "path/to/this/folder"
    merge = results.get("config", {}).get("MergeArguments", {})
    train = results.get("config", {}).get("PMConfig", {})
    summary = ", ".join(f"{name} {_pct(results.get(key))}" for name, key in SUMMARY)
    tagged, metric = info.get("tagged"), results.get("primary_metric", "accuracy")
    knobs = (
        f"merge strategy `{merge.get('merge_method')}`, perturbation `{train.get('perturbation')}` "
        f"(ε = {train.get('perturb_eps')}), head alignment `{merge.get('head_align')}`, learning rate "
        f"{train.get('learning_rate')}, epochs per task {train.get('num_train_epochs')}, seed {train.get('seed')}"
    )
    revision = f', revision="task-{len(results["tasks"])}"' if tagged else ""
    tags_note = "\nThe model after task t is the revision (tag) `task-t` of this repository.\n" if tagged else ""
    return f"""
# {repo_id or "A continually fine-tuned model"}

Fine-tuned on {len(results["tasks"])} tasks, one after another, with **Perturb-and-Merge** (P&M, NeurIPS 2025) by
`pm_hf`, from `{info.get("base_model")}`: each task trained a fresh LoRA adapter (perturbation
`{train.get("perturbation")}`), then was merged into the running model with the coefficient α of the merge
strategy `{info.get("merge_method", merge.get("merge_method"))}`. Scores ({metric}, %): {summary}.

## Task sequence and α per task

{alpha_table(results)}

## Accuracy matrix

R[t][j] = {metric} (%) on task j after training task t, over all classes seen so far.

{matrix_table(results)}

![accuracy matrix](accuracy_matrix.png)

## Method and key settings

{knobs}. Every number above and the run's full config are in `results.json` of this folder;
`pm_hf_export.json` records the export.

## How to load

```python
from peft import {LOADERS[task]}

model = {LOADERS[task]}.from_pretrained("{where}"{revision})
```
{tags_note}
## Citation

```bibtex
{CITATION}
```
"""


def write_card(folder: Path, results: dict, repo_id: str | None = None) -> ModelCard:
    """Write `folder/README.md` (and the matrix heatmap next to it) from results.json's content."""
    folder = Path(folder)
    info = json.loads((folder / "pm_hf_export.json").read_text())
    card = ModelCard(f"---\n{card_data(results, info, repo_id).to_yaml()}\n---\n{_body(results, info, repo_id)}")
    card.save(folder / "README.md")
    return card
