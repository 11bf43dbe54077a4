"""Self-describing exports (`pm-hf export`, `pm_hf.run.runs.export_run_dir`): each mode loads alone (pm_hf's loader,
PEFT
on the folder's base/, plain `AutoModelFor...` when merged) and reproduces the run's logits, with the card of its kind;
the SVD export's errors against a brute-force SVD; `pm-hf evaluate` of an export folder with a data config gives the
run's last row; an image classifier's export loads; a copy of an export loads elsewhere after the run and the original
are deleted, with the same logits."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from card_checks import check_card
from conftest import DATA, groups, randomize_lora, tiny_vit, two_domains
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pm_hf.commands.cli import main as cli_main
from pm_hf.config.groups import RunConfig
from pm_hf.continual import build_loop, run_continual
from pm_hf.errors import InputError
from pm_hf.hub.export import (
    ExportSpec,
    history_delta,
    load_task_records,
    record_digest,
    task_record,
    write_export,
)
from pm_hf.method.adapters import adapter_factors, full_trainable_params
from pm_hf.run.checkpoint import load_checkpoint
from pm_hf.run.runs import evaluate_run, launch_folders, load_adapter_export, load_export


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """A finished 3-task run and its merged model's logits on a batch of the first task's test split."""
    out = tmp_path_factory.mktemp("export_run")
    loop = build_loop(RunConfig(*groups(model_dir, out)))
    results = loop.run()
    batch = loop.stream.collate_fn([loop.stream.tasks[0].eval[i] for i in range(6)])
    batch.pop("labels")
    loop.model.eval()
    with torch.no_grad():
        logits = loop.model(**batch).logits
    return out, results, batch, logits


def test_adapter_export_loads_alone_and_reproduces_the_logits(run, tmp_path, capsys):
    out, results, batch, logits = run
    assert cli_main(["export", str(out), "--output", str(tmp_path / "a")]) == 0
    assert "mode adapter" in capsys.readouterr().out
    folder = tmp_path / "a"
    model = load_adapter_export(folder, "sequence_classification")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(str(folder / "base"))  # PEFT alone, as the card says
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(base, str(folder))(**batch).logits, logits)
    card = check_card(folder)
    assert card.data.library_name == "peft" and card.data.base_model is None  # the tiny BERT is a local model
    info = json.loads((folder / "pm_hf_export.json").read_text())
    assert info["task"] == "sequence_classification" and info["alphas"] == results["alphas"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["r"] == 3 * 4  # exact: rank = sum of the task ranks
    assert AutoTokenizer.from_pretrained(str(folder))("a cat")["input_ids"]
    assert model.config.id2label[1] == "animal"


def test_an_export_records_the_run_as_it_trained(run, tmp_path):
    """The export's results.json is the run's own (its config, output_dir and peak memory as trained), not this
    process's view of it: two exports of the run write the same bytes, and the run folder is left as it was."""
    out = run[0]
    before = (out / "results.json").read_bytes()
    for name in ("x", "y"):
        assert cli_main(["export", str(out), "--output", str(tmp_path / name)]) == 0
    assert (tmp_path / "x" / "results.json").read_bytes() == (tmp_path / "y" / "results.json").read_bytes()
    assert json.loads((tmp_path / "x" / "results.json").read_text()) == json.loads(before)
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["values", "truncated"])
def test_a_damaged_adapter_record_is_not_exported(run, tmp_path, caplog, damage):
    """Each task's record (adapters/task_<t>.safetensors, outside the checkpoint's manifest) is checked against the
    sha256 of its content that the task's log entry keeps: a record whose values changed, or a truncated one, is
    named in a warning and the export is factored from the merged weights instead, with the run's logits."""
    out, _, batch, logits = run
    state, _ = load_checkpoint(out)
    records = load_task_records(out, 3)
    assert [record_digest(r) for r in records] == [e["record_sha256"] for e in state.log]  # the file round trip
    damaged = tmp_path / "run"
    shutil.copytree(out, damaged)
    path = damaged / "adapters" / "task_0.safetensors"
    if damage == "values":
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        key = next(k for k in tensors if k.startswith("B/"))
        tensors[key] = tensors[key] + 0.5
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match="is not the record the run wrote for task 0"):
            load_task_records(damaged, 3, [e["record_sha256"] for e in state.log])
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="pm_hf.hub.export"):
        assert cli_main(["export", str(damaged), "--output", str(tmp_path / "a")]) == 0
    assert "task_0.safetensors" in caplog.text and "factored from the merged weights" in caplog.text
    model = load_adapter_export(tmp_path / "a", "sequence_classification")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=1e-5)


def test_merged_export_loads_with_the_plain_auto_class(run, tmp_path):
    out, _, batch, logits = run
    assert cli_main(["export", str(out), "--mode", "merged", "--output", str(tmp_path / "m")]) == 0
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=1e-5)
    card = check_card(tmp_path / "m")
    assert card.data.library_name == "transformers" and "AutoPeft" not in card.text
    assert 'pipeline("text-classification"' in card.text and "![accuracy matrix](accuracy_matrix.png)" in card.text


def test_svd_export_errors_equal_a_brute_force_svd(run, tmp_path, capsys):
    out, results, batch, logits = run
    assert cli_main(["export", str(out), "--mode", "adapter-svd", "--rank", "2", "--output", str(tmp_path / "s")]) == 0
    assert "relative reconstruction error" in capsys.readouterr().out
    info = json.loads((tmp_path / "s" / "pm_hf_export.json").read_text())
    deltas = history_delta(load_task_records(out, 3))
    for key, delta in deltas.items():
        s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
        assert info["relative_error"][key] == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s**2).sum()), abs=1e-9)
    assert info["score_before"] == pytest.approx(results["acc"], abs=1e-9)
    assert info["score_change"] == pytest.approx(info["score_after"] - info["score_before"])
    assert json.loads((tmp_path / "s" / "adapter_config.json").read_text())["r"] == 2
    card = check_card(tmp_path / "s")  # its model-index: this adapter's own ACC, not the run's exact model's scores
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [("ACC", round(info["score_after"], 6))]
    assert "truncated by SVD" in card.text and f"it scores ACC {100 * info['score_after']:.2f}" in card.text
    full = tmp_path / "full"
    assert cli_main(["export", str(out), "--mode", "adapter-svd", "--rank", "12", "--output", str(full)]) == 0
    info = json.loads((full / "pm_hf_export.json").read_text())
    assert max(info["relative_error"].values()) < 1e-6 and info["score_change"] == 0.0  # rank sum(r): exact
    model = load_adapter_export(full, "sequence_classification")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-4, rtol=1e-4)


def test_evaluate_an_export_folder_on_a_data_config(run, tmp_path, capsys):
    out, results, _, _ = run
    assert cli_main(["export", str(out), "--output", str(tmp_path / "a")]) == 0
    data = groups("unused", tmp_path / "unused")[1]
    config = {"dataset_name": "parquet", "data_files": data.data_files, "class_groups": data.class_groups,
              "max_train_samples_per_class": 16, "max_eval_samples_per_class": 8, "max_length": 24, "seed": 3,
              "report_to": "none", "use_cpu": True}  # fmt: skip
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path / "a"), "--config", str(tmp_path / "data.yaml")]) == 0
    printed = capsys.readouterr().out
    for v in results["accuracy_matrix"][-1]:
        assert f"{100 * v:.2f}" in printed
    assert f"{100 * results['acc']:.2f}" in printed
    labels = len(json.loads((tmp_path / "a" / "base" / "config.json").read_text())["id2label"])
    twenty = DATA.parent / "wordnet_supersense20"  # 20 classes: 10 the export's head does not have
    config.update(data_files={s: str(twenty / f"{s}.parquet") for s in ("train", "test")}, class_groups=[[0, 19]])
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as err:
        cli_main(["evaluate", str(tmp_path / "a"), "--config", str(tmp_path / "more.yaml")])
    printed = capsys.readouterr().err
    assert err.value.code == 2 and f"num_labels = {labels}: the data config's tasks hold 20 classes" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "per-task"], "mode = 'per-task': needs a causal LM run"),
        (["--mode", "adapter-svd"], "rank = None: adapter-svd needs the rank"),
        (["--mode", "dense"], "mode = 'dense': use 'adapter'"),
        (["--mode", "adapter-svd", "--rank", "10000"], "rank = 10000: at most "),  # before: a 10000-rank file
    ],
)
def test_bad_export_requests_are_input_errors(run, tmp_path, capsys, argv, message):
    out = run[0]
    with pytest.raises(SystemExit) as err:
        cli_main(["export", str(out), "--output", str(tmp_path / "x"), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("inside", [".", "merged_adapter", "tasks", "new/folder"])
def test_an_export_into_the_run_folder_is_refused(run, capsys, inside):
    """The run folder, or a folder in it (its own merged_adapter/ or tasks/ would be replaced), is no --output."""
    out = run[0]
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as err:
        cli_main(["export", str(out), "--output", str(out / inside)])
    printed = capsys.readouterr().err
    assert err.value.code == 2 and printed.startswith("pm-hf: error: output = ") and "outside the run folder" in printed
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def test_an_image_classifier_export_loads_with_auto_peft_model(tmp_path):
    base = tiny_vit(num_labels=4)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.base_model.model.classifier.requires_grad_(True)  # trained in full, as the loop's head
    randomize_lora(model)
    head = {k: p.detach().float() + 0.5 for k, p in full_trainable_params(model).items()}
    record = task_record(adapter_factors(model), dict.fromkeys(adapter_factors(model), 0.7))
    spec = ExportSpec("local-vit", None, "image_classification", ["classifier"])
    write_export(copy.deepcopy(base), [record], head, spec, tmp_path / "vit")
    expected = copy.deepcopy(base)
    params = dict(expected.named_parameters())
    with torch.no_grad():
        for key, delta in history_delta([record]).items():
            params[key] += delta
        for key, value in head.items():
            params[key].copy_(value)
    pixels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loaded = load_adapter_export(tmp_path / "vit", "image_classification")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected.eval()(pixel_values=pixels).logits)


def test_an_export_moved_elsewhere_loads_with_the_same_logits(model_dir, tmp_path, monkeypatch):
    """Export a run (adapter and merged), copy the folders elsewhere, delete the run and the originals: the copies
    load (pm_hf's loader; PEFT's AutoPeft class from inside the folder, which it resolves `base` against) and give
    the original exports' logits."""
    run_dir = tmp_path / "run"
    loop = build_loop(RunConfig(*groups(model_dir, run_dir, class_groups=[[0, 1], [2, 3]])))
    loop.run()
    batch = loop.stream.collate_fn([loop.stream.tasks[0].eval[i] for i in range(6)])
    batch.pop("labels")
    expected = {}
    for mode in ("adapter", "merged"):
        assert cli_main(["export", str(run_dir), "--mode", mode, "--output", str(tmp_path / "orig" / mode)]) == 0
        with torch.no_grad():
            expected[mode] = load_export(str(tmp_path / "orig" / mode))[0].eval()(**batch).logits
    config = json.loads((tmp_path / "orig" / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("base", None)  # relative to the folder
    shutil.copytree(tmp_path / "orig", tmp_path / "elsewhere" / "copy")
    shutil.rmtree(run_dir)
    shutil.rmtree(tmp_path / "orig")
    for mode in ("adapter", "merged"):
        model, processor, info = load_export(str(tmp_path / "elsewhere" / "copy" / mode))
        assert info["format"] == mode and processor("a cat")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(**batch).logits, expected[mode], atol=1e-6, rtol=1e-6)
    monkeypatch.chdir(tmp_path / "elsewhere" / "copy" / "adapter")
    model = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected["adapter"], atol=1e-6, rtol=1e-6)


def test_a_run_folder_reads_its_relative_paths_from_where_it_was_launched(model_dir, tmp_path, monkeypatch):
    """A run launched in a project folder with relative data files, model and output_dir (its outputs/ a symlink to
    another disk, as on clusters): `evaluate` and `export` of it work from the project, from another working
    directory and after the project has moved, and results.json keeps the run's own record."""
    project, disk = tmp_path / "proj", tmp_path / "scratch"
    (project / "data").mkdir(parents=True)
    (disk / "runs").mkdir(parents=True)
    (project / "runs").symlink_to(disk / "runs")
    shutil.copytree(model_dir, project / "model")
    for split in ("train", "test"):
        shutil.copyfile(DATA / f"{split}.parquet", project / "data" / f"{split}.parquet")
    monkeypatch.chdir(project)
    files = {split: f"data/{split}.parquet" for split in ("train", "test")}
    results = run_continual(*groups("model", "runs/r", data_files=files, class_groups=[[0, 1], [2, 3]]))
    before = (project / "runs" / "r" / "results.json").read_bytes()
    assert cli_main(["export", "runs/r", "--output", str(tmp_path / "x")]) == 0  # from the project: outputs/ a symlink
    shutil.move(project, tmp_path / "moved")
    run_dir = tmp_path / "moved" / "runs" / "r"
    monkeypatch.chdir(tmp_path)
    assert evaluate_run(str(run_dir))["last_row"] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-9)
    assert (run_dir / "results.json").read_bytes() == before and results["output_dir"] == "runs/r"
    assert cli_main(["export", "moved/runs/r", "--output", "y"]) == 0  # the model read again, from the moved project
    assert (tmp_path / "x" / "results.json").read_bytes() == (tmp_path / "y" / "results.json").read_bytes()
    for name, where in (("x", project), ("y", tmp_path / "moved")):  # the base: the local model, not a Hub id
        info = json.loads((tmp_path / name / "pm_hf_export.json").read_text())
        assert info["hub_id"] is None and info["base_model"] == str(where / "model"), info
    assert launch_folders(run_dir, "runs/r") == [tmp_path / "moved", disk]  # as given first, then resolved
    assert launch_folders(run_dir, "./runs//r/") == [tmp_path / "moved", disk]
    assert launch_folders(run_dir, "r") == [run_dir.parent, disk / "runs"]
    for recorded in ("other/r", str(run_dir), "../r", "r/runs", "moved/runs/r/x"):
        assert launch_folders(run_dir, recorded) == [], recorded


def test_an_export_info_naming_no_task_is_an_input_error(tmp_path):
    """A damaged pm_hf_export.json (`{}`): `model = ...`, not a KeyError."""
    (tmp_path / "pm_hf_export.json").write_text("{}")
    with pytest.raises(InputError, match=r"^model = .*names no task of"):
        load_export(str(tmp_path))


def test_a_rank_given_as_text_from_python_is_an_input_error(run, tmp_path):
    """`export_run_dir(..., rank="2")`: before, a TypeError comparing it with 1."""
    from pm_hf.run.runs import export_run_dir

    with pytest.raises(InputError, match=r"^rank = '2': give an integer rank"):
        export_run_dir(run[0], tmp_path / "x", mode="adapter-svd", rank="2")
    assert not (tmp_path / "x").exists()


def test_a_domain_run_of_relative_task_datasets_reads_back_from_elsewhere(model_dir, tmp_path, monkeypatch):
    """`task_datasets` entries that name only their files (their builder the top-level one): evaluate from another
    folder reads them under the launch folder (before the fix, the rewrite gave them `dataset_name: None`)."""
    project = tmp_path / "proj"
    project.mkdir()
    monkeypatch.chdir(project)
    domains = two_domains("data")  # relative paths
    results = run_continual(*groups(model_dir, "runs/r", task_datasets=domains, scenario="domain_incremental",
                                    class_groups=None))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    again = evaluate_run(str(project / "runs" / "r"))
    assert again["last_row"] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-9)
