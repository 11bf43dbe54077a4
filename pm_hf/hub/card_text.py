"""The text of an export's model card (`pm_hf.hub.card` adds the metadata): what the model is and where it comes from,
the tables of alpha and of the scores, the plots present in the folder, the key settings that are set, how to load
this kind of output, the framework versions and the citation."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .origin import IN_MEMORY, resolve_base

PIPELINES = {"sequence_classification": "text-classification", "image_classification": "image-classification",
             "causal_lm": "text-generation"}  # fmt: skip
AUTO_CLASSES = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
    "causal_lm": "AutoModelForCausalLM",
}
PEFT_CLASSES = {
    "sequence_classification": "AutoPeftModelForSequenceClassification",
    "image_classification": "AutoPeftModel",
    "causal_lm": "AutoPeftModelForCausalLM",
}
# (name in the card, key of results.json, metric type: None = the primary metric, of which ACC and AAA are means)
SUMMARY = (("ACC", "acc", None), ("AAA", "aaa", None), ("BWT", "bwt", "backward_transfer"),
           ("forgetting", "forgetting", "forgetting"))  # fmt: skip
PLOTS = (("accuracy_matrix.png", "accuracy matrix"), ("accuracy_curve.png", "score over the sequence and alpha"))
MERGE_KNOBS = {"task-arithmetic": ("merge_scale",), "ties": ("merge_scale", "ties_density"), "magmax": ("merge_scale",),
               "coma": ("fixed_alpha",), "cofima": ("cofima_weight",)}  # fmt: skip
CITATION = """@inproceedings{qiu2025perturbmerge,
  title     = {Train with Perturbation, Infer after Merging: A Two-Stage Framework for Continual Learning},
  author    = {Qiu, Haomiao and Zhang, Miao and Qiao, Ziyue and Nie, Liqiang},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  url       = {https://arxiv.org/abs/2505.22389}
}"""


# `pm-hf merge` without data: the rule for what PEFT's adapters train in full (pm_hf.run.posthoc; the card and
# `pm-hf merge --help` say it)
HEAD_RULE = (
    "the modules the adapters train in full (PEFT's `modules_to_save`, such as the `classifier` head of a SEQ_CLS "
    "adapter) are the plain average of the adapters' copies (weight 1/N each, whatever the merge rule of the LoRA "
    "weights)"
)


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


def _num(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.4f}"


def is_posthoc(info: dict) -> bool:
    return bool(info.get("merged_adapters"))


def matrix_table(results: dict) -> str:
    """R[t][j] of results.json as a markdown table (percent)."""
    tasks, R = results["tasks"], results["accuracy_matrix"]
    head = "| after task | " + " | ".join(f"{j + 1}. {n.split(': ', 1)[-1]}" for j, n in enumerate(tasks)) + " |"
    rows = [f"| {t + 1} | " + " | ".join(_pct(v) for v in row) + " |" for t, row in enumerate(R)]
    return "\n".join([head, "|---" * (len(tasks) + 1) + "|", *rows])


def alpha_table(results: dict, what: str = "task") -> str:
    """alpha per task (used and raw) as a markdown table."""
    rows = [f"| {what} | α used | α raw |", "|---|---|---|"]
    for t, (a, raw) in enumerate(zip(results["alphas"], results["alphas_raw"])):
        rows.append(f"| {t + 1}. {results['tasks'][t]} | {_num(a)} | {_num(raw)} |")
    return "\n".join(rows)


def _base(info: dict) -> str:
    if info.get("hub_id"):
        at = f" (revision `{info['revision']}`)" if info.get("revision") else ""
        return f"[`{info['hub_id']}`](https://huggingface.co/{info['hub_id']}){at}"
    if info.get("base_model") in (None, "", IN_MEMORY):
        return "a model given as an object (no folder or Hub id recorded)"
    return f"a local model (`{info['base_model']}`, not from the Hub)"


def _settings(results: dict, info: dict) -> list[str]:
    """'name value' of the key settings that are set."""
    config = results.get("config", {})
    merge, train, lora = (config.get(k, {}) for k in ("MergeArguments", "PMConfig", "LoraArguments"))
    method = info.get("merge_method") or merge.get("merge_method")
    pairs = [("merge strategy", f"`{method}`" if method else None)]
    pairs += [(knob.replace("_", " "), merge.get(knob)) for knob in MERGE_KNOBS.get(method, ())]
    if not is_posthoc(info):
        perturbation = train.get("perturbation")
        eps = f" (ε = {train['perturb_eps']})" if perturbation not in (None, "none") and "perturb_eps" in train else ""
        pairs += [("perturbation", f"`{perturbation}`{eps}" if perturbation else None)]
        pairs += [(n.replace("_", " "), train.get(n)) for n in ("learning_rate", "num_train_epochs", "seed")]
    if merge.get("head_align") not in (None, "none"):
        pairs.append(("head alignment", f"`{merge['head_align']}`"))
    pairs += [("LoRA rank", lora.get("r")), ("LoRA alpha", lora.get("lora_alpha"))]
    return [f"{name} {value}" for name, value in pairs if value is not None]


def _intro(results: dict, info: dict) -> str:
    n, base = len(results["tasks"]), _base(info)
    method = info.get("merge_method") or results.get("config", {}).get("MergeArguments", {}).get("merge_method")
    if is_posthoc(info):
        inputs = "\n".join(f"{t + 1}. `{a}`" for t, a in enumerate(info["merged_adapters"]))
        data = " with each adapter's task data" if results.get("accuracy_matrix") else ", without data"
        rule = f"\n\nIn the merge, {info['head_rule']}." if info.get("head_rule") else ""
        return (f"{n} LoRA adapters trained from {base}, merged in this order by `pm-hf merge` (`pm_hf`){data}, with "
                f"the merge rule `{method}`:\n\n{inputs}{rule}")  # fmt: skip
    return (f"Fine-tuned on {n} tasks, one after another, by `pm_hf` from {base}: each task trained a LoRA "
            f"adapter, then was merged into the running model with the coefficient α of the merge strategy "
            f"`{method}`.")  # fmt: skip


def _format(info: dict, folder: Path) -> str:
    if info.get("format") == "merged":
        return "This folder is the full model, the merged adapters folded into the base weights: a Transformers model."
    config = json.loads((folder / "adapter_config.json").read_text())
    text = f"This folder is one PEFT LoRA adapter of rank {_rank(folder)}"
    if resolve_base(folder, config["base_model_name_or_path"]) != config["base_model_name_or_path"]:
        text += (f", on `{config['base_model_name_or_path']}/` (the pretrained model with a head of the run's classes),"
                 " which `adapter_config.json` names relative to this folder")  # fmt: skip
    return text + (_svd_note(info) if info.get("mode") == "adapter-svd" else "") + "."


def _svd_note(info: dict) -> str:
    errors = list(info.get("relative_error", {}).values()) or [0.0]
    text = f"; it is the merged delta truncated by SVD (relative error per module at most {max(errors):.4f})"
    if info.get("score_after") is None:
        return text
    before, after = _pct(info.get("score_before")), _pct(info["score_after"])
    return f"{text}: it scores ACC {after} where the run's exact model, whose scores this card gives, scores {before}"


def _scores(results: dict, info: dict, folder: Path) -> str:
    if not results.get("accuracy_matrix"):
        return ""
    metric = results.get("primary_metric", "accuracy")
    title = "Accuracy matrix" if metric == "accuracy" else f"Score matrix ({metric})"
    plots = [f"![{alt}]({name})" for name, alt in PLOTS if (folder / name).is_file()]
    seen = ", over all classes seen so far" if info.get("task") != "causal_lm" else ""
    text = f"## {title}\n\nR[t][j] = {metric} (%) on task j after task t{seen}.\n\n"
    return text + "\n\n".join([matrix_table(results), *plots])


def summary_line(results: dict) -> str:
    """'Scores (accuracy, %): ACC 81.25, AAA ...' of the summary scores results.json has."""
    scores = [f"{name} {_pct(results[key])}" for name, key, _ in SUMMARY if results.get(key) is not None]
    return f"Scores ({results.get('primary_metric', 'accuracy')}, %): {', '.join(scores)}." if scores else ""


def _usage(info: dict, repo_id: str | None, folder: Path) -> str:
    task, where = info.get("task", "sequence_classification"), repo_id or "path/to/this/folder"
    revision = f', revision="task-{len(info.get("tasks") or [])}"' if info.get("tagged") else ""
    if info.get("format") == "merged":
        auto = AUTO_CLASSES[task]
        return (f'from transformers import {auto}, pipeline\n\npipe = pipeline("{PIPELINES[task]}", model="{where}"'
                f'{revision})\nmodel = {auto}.from_pretrained("{where}"{revision})')  # fmt: skip
    pm_hf = f'from pm_hf import load_export\n\nmodel, processor, info = load_export("{where}")  # the adapter merged in'
    if repo_id is None and (folder / "base").is_dir():
        return (f"{pm_hf}\n\n# or with PEFT alone, on this folder's base/:\nfrom peft import PeftModel\n"
                f"from transformers import {AUTO_CLASSES[task]}\n\n"
                f'base = {AUTO_CLASSES[task]}.from_pretrained("{where}/base")\n'
                f'model = PeftModel.from_pretrained(base, "{where}")')  # fmt: skip
    peft = PEFT_CLASSES[task]
    return f'from peft import {peft}\n\nmodel = {peft}.from_pretrained("{where}"{revision})\n\n# or\n{pm_hf}'


def _load_note(info: dict, repo_id: str | None, folder: Path) -> str:
    if info.get("format") != "merged" and repo_id is None and (folder / "base").is_dir():
        return ("`adapter_config.json` names its base relative to this folder (`base`), so the folder loads wherever "
                "it is moved or copied with `pm_hf.load_export`; PEFT's `AutoPeftModelFor...` classes resolve that "
                "path against the working directory instead (they load the folder only from inside it).")  # fmt: skip
    tagged = "The model after task t is the revision (tag) `task-t` of this repository." if info.get("tagged") else ""
    return tagged


def _versions(info: dict) -> str:
    versions = "\n".join(f"- {k} {v}" for k, v in (info.get("versions") or {}).items())
    return f"## Framework versions\n\n{versions}" if versions else ""


def task_body(info: dict, folder: Path) -> str:
    """The markdown of the card of one task's adapter (`pm-hf export --mode per-task`)."""
    t, task, rank = info["per_task"], info.get("task", "causal_lm"), _rank(folder)
    name = f" ({info['task_name']})" if info.get("task_name") else ""
    alphas = sorted(set((info.get("alpha_used") or {}).values()))
    used = f"α = {alphas[0]:.4f}" if len(alphas) == 1 else "α per layer in `pm_hf_export.json`"
    peft = PEFT_CLASSES[task]
    usage = f'from peft import {peft}\n\nmodel = {peft}.from_pretrained("path/to/this/folder")'
    parts = [
        f"# Task {t + 1}'s LoRA adapter{name}",
        f"The LoRA adapter (rank {rank}) that `pm_hf` trained on task {t + 1}{name} of a continual run from "
        f"{_base(info)}, as trained, before any merge (the run merged it with {used}). `pm-hf merge --adapters "
        "task_0 task_1 ... --output merged` merges such adapters, in order, with any merge rule.",
        f"## How to load\n\n```python\n{usage}\n```",
        _versions(info),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return "\n" + "\n\n".join(p for p in parts if p) + "\n"


def _rank(folder: Path):
    return json.loads((folder / "adapter_config.json").read_text()).get("r")


def body(results: dict, info: dict, repo_id: str | None, folder: Path) -> str:
    """The card's markdown below its metadata."""
    posthoc = is_posthoc(info)
    title = repo_id or ("A merge of LoRA adapters" if posthoc else "A continually fine-tuned model")
    settings = "\n".join(f"- {s}" for s in _settings(results, info))
    recorded = "`results.json` holds every number above and the config; " if results.get("config") else ""
    parts = [
        f"# {title}",
        _intro(results, info),
        " ".join(s for s in (summary_line(results), _format(info, folder)) if s),
        f"## {'Adapters' if posthoc else 'Task sequence'} and α per {'adapter' if posthoc else 'task'}",
        alpha_table(results, "adapter" if posthoc else "task"),
        _scores(results, info, folder),
        f"## Key settings\n\n{settings}\n\n{recorded}`pm_hf_export.json` records the export.",
        f"## How to load\n\n```python\n{_usage(info, repo_id, folder)}\n```",
        _load_note(info, repo_id, folder),
        _versions(info),
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return "\n" + "\n\n".join(p for p in parts if p) + "\n"
