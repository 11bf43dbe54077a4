"""`ContinualTrainer`, the Python API: objects or paths, tasks appended to an open-ended sequence (bit for bit the
longer run), user metrics, streamed training data, Hub loading options, domain-incremental runs end to end, and the
same open-ended sequences from the CLI (`--resume` with more tasks, `resume_from`)."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from card_checks import check_card
from conftest import DATA, Recorder, checkpoint_tensors, groups, tiny_bert, two_domains
from peft import PeftModel
from sklearn.metrics import f1_score
from transformers import AutoModelForSequenceClassification

from pm_hf import ContinualTrainer, PMConfig
from pm_hf.config.checks import InputError
from pm_hf.config.groups import DataArguments, FisherArguments, LoraArguments
from pm_hf.continual import run_continual
from pm_hf.testing import tiny_tokenizer

WORDNET = {s: datasets.Dataset.from_pandas(pd.read_parquet(DATA / f"{s}.parquet")) for s in ("train", "test")}


def task(*classes, n_train=16, n_eval=8):
    """A class-incremental task: the first n rows of each class (global class ids as labels)."""
    out = {}
    for split, n in (("train", n_train), ("test", n_eval)):
        frame = WORDNET[split].to_pandas()
        rows = pd.concat([frame[frame.label == c].head(n) for c in classes]).sort_index()
        out[split] = datasets.Dataset.from_pandas(rows[["text", "label"]], preserve_index=False)
    return out


def args(out, **kw):
    values = dict(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=8, learning_rate=2e-2,
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=3)  # fmt: skip
    return PMConfig(**{**values, **kw})


def trainer(model, out, tasks, **kw):
    kw.setdefault("lora_args", LoraArguments(r=4, modules_to_save=["pooler"]))
    kw.setdefault("fisher_args", FisherArguments(fisher_max_samples=24))
    kw.setdefault("args", args(out))
    return ContinualTrainer(model=model, tasks=tasks, **kw)


def numbers(results):
    return {k: results[k] for k in ("accuracy_matrix", "til_accuracy_matrix", "alphas", "alphas_raw", "pre_merge_acc")}


def same_state(a: Path, b: Path) -> bool:
    x, y = checkpoint_tensors(a), checkpoint_tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow  # three runs; the CLI extension test keeps the property in the default tier
def test_appending_tasks_equals_the_longer_run_bit_for_bit(model_dir, tmp_path, monkeypatch):
    tasks = [task(0, 1), task(2, 3), task(4, 5)]
    at_once = trainer(model_dir, tmp_path / "once", tasks).train().results
    staged = trainer(model_dir, tmp_path / "staged", tasks[:2])
    assert len(staged.train().results["accuracy_matrix"]) == 2
    shutil.copytree(tmp_path / "staged", tmp_path / "later")  # the 2-task run, continued in another process below
    shutil.copytree(tmp_path / "staged", tmp_path / "changed")  # resumed with another config or data: refused
    assert numbers(staged.add_task(tasks[2]).train().results) == numbers(at_once)  # new classes grew the head
    assert same_state(tmp_path / "staged", tmp_path / "once")
    later = trainer(model_dir, tmp_path / "later", tasks).train(resume_from_checkpoint=True).results
    assert numbers(later) == numbers(at_once) and same_state(tmp_path / "later", tmp_path / "once")
    before = {p: p.read_bytes() for p in (tmp_path / "changed").rglob("*") if p.is_file()}
    loads = []
    real = AutoModelForSequenceClassification.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        classmethod(lambda c, *a, **k: loads.append(a) or real(c, *a, **k)))  # fmt: skip
    for changed, what in ((dict(args=args(tmp_path / "changed", seed=4)), "seed: 3 -> 4"),
                          (dict(tasks=[tasks[1], tasks[0]]), "the data of tasks [0, 1] differs")):  # fmt: skip
        kw = {"args": args(tmp_path / "changed"), "tasks": tasks, **changed}
        with pytest.raises(InputError, match=rf"^resume_from_checkpoint = .*{re.escape(what)}"):
            trainer(model_dir, tmp_path / "changed", kw["tasks"], args=kw["args"]).train(resume_from_checkpoint=True)
    assert not loads and before == {p: p.read_bytes() for p in (tmp_path / "changed").rglob("*") if p.is_file()}


def test_user_metrics_get_their_own_score_matrix(model_dir, tmp_path):
    seen = []

    def macro_f1(prediction):
        seen.append(prediction)
        return {"macro_f1": f1_score(prediction.label_ids, prediction.predictions.argmax(-1), average="macro")}

    results = trainer(model_dir, tmp_path / "run", [task(0, 1), task(2, 3)], compute_metrics=macro_f1).train().results
    f1 = results["score_matrices"]["macro_f1"]
    assert len(f1) == 2 and f1[0][1] is None and all(0 <= v <= 1 for v in (f1[0][0], f1[1][0], f1[1][1]))
    # the predictions it was given are those the accuracy matrix was computed from (seen classes, every task)
    last = seen[-1]
    assert last.predictions.shape == (16, 4)
    assert results["accuracy_matrix"][1][1] == pytest.approx(
        float((last.predictions.argmax(-1) == last.label_ids).mean())
    )


def _train_a_model_object(tmp_path, num_labels: int):
    """A tiny BERT object with `num_labels` head rows trained on classes 0-3; returns it, its tokenizer, the results."""
    tok = tiny_tokenizer(tmp_path / "tok", WORDNET["train"]["text"][:500])
    model = tiny_bert(num_labels=num_labels, seed=0)
    model.resize_token_embeddings(len(tok))
    results = ContinualTrainer(model=model, args=args(tmp_path / "run"), tasks=[task(0, 1), task(2, 3)],
                               processing_class=tok, lora_args=LoraArguments(r=2),
                               data_args=DataArguments(max_length=24)).train().results  # fmt: skip
    return model, tok, results


def _export_logits_match(model, tok, tmp_path, num_labels: int) -> None:
    """The run's merged adapter on the same backbone with a head of `num_labels` rows gives the model's logits."""
    base = tiny_bert(num_labels=num_labels, seed=0)
    base.resize_token_embeddings(len(tok))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "merged_adapter")).eval()
    batch = tok(["a small animal", "the state of things"], return_tensors="pt", padding=True)
    with torch.no_grad():  # `model` itself is the merged model: PEFT wrapped it in place
        expected, got = model.eval()(**batch).logits, loaded(**batch).logits
    assert got.shape == (2, num_labels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_model_object_with_no_folder_trains_and_exports(tmp_path):
    model, tok, results = _train_a_model_object(tmp_path, num_labels=2)
    assert len(results["accuracy_matrix"]) == 2 and model.classifier.out_features == 4  # grew for classes 2, 3
    _export_logits_match(model, tok, tmp_path, num_labels=4)  # the same backbone with a head of the final size
    card = check_card(tmp_path / "run" / "merged_adapter")
    assert card.data.base_model is None and "a model given as an object" in card.text


def test_a_model_object_with_a_wider_head_trains_every_task_and_exports(tmp_path):
    """A head with more rows than the tasks' classes (6 rows, classes 0-3) is kept as it is: the tasks train, the
    export's base has the same 6 rows, and the export reloads to the run's logits (it used to fail after training)."""
    model, tok, results = _train_a_model_object(tmp_path, num_labels=6)
    assert len(results["accuracy_matrix"]) == 2 and model.classifier.out_features == 6
    _export_logits_match(model, tok, tmp_path, num_labels=6)


def test_a_streamed_training_split_needs_steps_and_a_fisher_sample(model_dir, tmp_path):
    streamed = task(2, 3)
    streamed = {"train": streamed["train"].to_iterable_dataset(), "test": streamed["test"], "classes": [2, 3]}
    with pytest.raises(InputError, match="max_steps > 0 and fisher_max_samples"):
        trainer(model_dir, tmp_path / "a", [task(0, 1), streamed]).train()
    run = ContinualTrainer(model=model_dir, args=args(tmp_path / "b", max_steps=3), tasks=[task(0, 1), streamed],
                           lora_args=LoraArguments(r=2), fisher_args=FisherArguments(fisher_max_samples=8))  # fmt: skip
    results = run.train().results
    assert len(results["accuracy_matrix"]) == 2 and results["alpha_terms"][1]["denominator"] > 0


def test_hub_loading_options_reach_from_pretrained(model_dir, tmp_path, monkeypatch):
    import transformers

    calls = []
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        original = auto.from_pretrained.__func__

        def record(cls, path, *a, _original=original, **kw):
            calls.append((cls.__name__, kw))
            return _original(cls, path, *a, **kw)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(record))
    model_args, *rest = groups(model_dir, tmp_path / "run", class_groups=[[0, 1], [2, 3]])
    model_args.revision, model_args.attn_implementation = "main", "eager"
    run_continual(model_args, *rest, stop_after=1)
    kwargs = {name: kw for name, kw in calls}
    assert all(kw.get("revision") == "main" and kw.get("trust_remote_code") is False for kw in kwargs.values())
    assert kwargs["AutoModelForSequenceClassification"]["attn_implementation"] == "eager"


def test_domain_incremental_runs_end_to_end_and_merges_the_shared_head(model_dir, tmp_path):
    """Two domains of the same 4 classes: one head, merged like any parameter (the same alpha)."""
    domains = two_domains(tmp_path)

    class HeadAround(Recorder):
        def on_task_begin(self, t, model, task):
            self.before = model.get_submodule("base_model.model.classifier").weight.detach().clone()

        def on_train_end(self, t, model, task):
            self.trained = model.get_submodule("base_model.model.classifier").weight.detach().clone()

    recorder = HeadAround()
    *first, merge = groups(model_dir, tmp_path / "run", task_datasets=domains, scenario="domain_incremental")
    results = run_continual(*first, merge, callbacks=[recorder])
    assert results["tasks"][1] == "task_1: domain1" and len(results["accuracy_matrix"]) == 2
    alpha = results["alphas"][1]
    merged = recorder.params[1]["classifier.weight"]
    torch.testing.assert_close(merged, recorder.before + alpha * (recorder.trained - recorder.before))
    assert 0 < alpha < 1


SLOW_WAYS = [pytest.param(how, marks=pytest.mark.slow) for how in ("task_datasets", "resume_from")]


@pytest.mark.parametrize("how", ["class_groups", *SLOW_WAYS])
def test_the_cli_extends_a_run_with_more_tasks_bit_for_bit(how, model_dir, tmp_path):
    if how == "task_datasets":  # one dataset per task: the third brings new classes (the head grows)
        parts = []
        for k in range(3):
            folder = tmp_path / f"part{k}"
            folder.mkdir()
            for split in ("train", "test"):
                f = pd.read_parquet(DATA / f"{split}.parquet")
                f[f.label.isin([2 * k, 2 * k + 1])].assign(label=lambda x, k=k: x.label - 2 * k).to_parquet(
                    folder / f"{split}.parquet"
                )
            parts.append({"data_files": {s: str(folder / f"{s}.parquet") for s in ("train", "test")}})
        extra = {"task_datasets": parts, "scenario": "task_incremental"}
        short = {**extra, "task_datasets": parts[:2]}
    else:
        extra, short = {}, {"class_groups": [[0, 1], [2, 3]]}
    once = run_continual(*groups(model_dir, tmp_path / "once", **extra))
    run_continual(*groups(model_dir, tmp_path / "two", **short))
    if how == "resume_from":
        more = run_continual(*groups(model_dir, tmp_path / "three", resume_from=str(tmp_path / "two"), **extra))
        folder = tmp_path / "three"
    else:
        more = run_continual(*groups(model_dir, tmp_path / "two", **extra), resume=True)
        folder = tmp_path / "two"
    assert numbers(more) == numbers(once) and same_state(folder, tmp_path / "once")


def test_progress_is_one_bar_over_tasks(capsys, tmp_path):
    from pm_hf.commands.cli import main

    root = Path(__file__).resolve().parents[1]
    err = io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--config", "configs/ci_tiny.yaml", "--output_dir", str(tmp_path / "run")])
    text = err.getvalue()
    assert "tasks:" in text and "task 1:" in text  # the bar over tasks, a training bar per task
    for noise in ("Map", "Preparing task", "Loading weights", "LOAD REPORT", "{'loss'", "Generating"):
        assert noise not in text, noise
    assert np.isfinite(json.loads((tmp_path / "run" / "results.json").read_text())["acc"])


def test_a_model_object_from_a_folder_with_a_wider_head_exports_too(model_dir, tmp_path):
    """A model object that names its folder, its head wider than the tasks' classes: the export's base is a copy of
    it (a reload from the folder has the tasks' rows only: the run crashed at its export, after training)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=6, ignore_mismatched_sizes=True)
    results = trainer(model, tmp_path / "run", [task(0, 1), task(2, 3)]).train().results
    from pm_hf import load_export

    exported = load_export(str(tmp_path / "run" / "merged_adapter"))[0]
    assert len(results["accuracy_matrix"]) == 2 and exported.config.num_labels == 6


@pytest.mark.parametrize(
    ("tasks", "match", "added"),
    [(lambda: [task(0), task(2, 3)], r"^tasks\[0\] = \[0\]: one class", r"^tasks\[1\] = \[0\]: one class"),
     (lambda: [task(0, 1), task(1, 2)], r"^tasks\[1\] = \[1\]: classes an earlier task trained",
      r"^tasks\[2\] = \[1\]: classes an earlier task trained")],
)  # fmt: skip
def test_tasks_given_as_objects_are_checked_as_class_groups_are(model_dir, tmp_path, tasks, match, added):
    """One class under the class-incremental mask trained nothing (its loss was 0); a class of an earlier task was
    taken silently. Both are refused before anything is written, as `class_groups` are; also through add_task."""
    with pytest.raises(InputError, match=match):
        trainer(model_dir, tmp_path / "a", tasks()).train()
    assert not (tmp_path / "a").exists()
    first, later = tasks()
    seq = trainer(model_dir, tmp_path / "b", [task(4, 5)])
    seq.train()
    with pytest.raises(InputError, match=added):
        seq.add_task(first).add_task(later).train()


def test_a_language_model_made_in_memory_needs_its_tokenizer(tmp_path):
    """Before: `TypeError: 'NoneType' object is not callable` from inside the tokenization."""
    with pytest.raises(InputError, match=r"^processing_class = None: no tokenizer came with this language model"):
        trainer(tiny_bert(num_labels=2), tmp_path / "a", [task(0, 1)]).train()
    assert not (tmp_path / "a").exists()


def test_a_run_trained_on_python_datasets_names_why_its_folder_cannot_be_exported(model_dir, tmp_path):
    """Its folder records no data to rebuild the tasks from: before, `data_files = None: the 'parquet' builder ...`,
    a field the user never set; the trainer itself exports it."""
    from pm_hf.run.runs import evaluate_run, export_run_dir

    seq = trainer(model_dir, tmp_path / "run", [task(0, 1)])
    seq.train()
    for call in (lambda: export_run_dir(tmp_path / "run", tmp_path / "x"), lambda: evaluate_run(str(tmp_path / "run"))):
        with pytest.raises(InputError, match=r"^run_dir = .*: was trained on datasets given in Python"):
            call()
    seq.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()


def test_a_model_holding_lora_layers_is_refused(model_dir, tmp_path):
    """A PEFT model's inner model (LoRA layers inside a PreTrainedModel) was trained as if fresh; attach_lora on an
    attached model nested two PEFT models."""
    from peft import LoraConfig, get_peft_model

    from pm_hf.method.adapters import attach_lora

    inner = get_peft_model(tiny_bert(num_labels=2), LoraConfig(r=2, target_modules=["query"])).base_model.model
    with pytest.raises(InputError, match=r"^model = 'BertForSequenceClassification': give a Hub id"):
        trainer(inner, tmp_path / "a", [task(0, 1)])
    attached = attach_lora(tiny_bert(num_labels=2), LoraArguments(r=2, target_modules=["query"]))
    with pytest.raises(InputError, match=r"^model = 'PeftModel.*': already holds LoRA layers"):
        attach_lora(attached, LoraArguments(r=2, target_modules=["query"]))
