"""`pm-hf merge` on adapters made by plain PEFT (`get_peft_model(model, LoraConfig(task_type="SEQ_CLS", ...))
.save_pretrained(dir)`, which saves the head as `modules_to_save`) on the committed tiny BERT: a data-free merge
loads with PEFT and equals base + sum_t alpha_t s B_t A_t with the head the plain average of the adapters' heads; a
base named by a relative and by an absolute path is one model; every mismatch is `pm-hf: error: <field> = ...`,
exit 2, with no output folder; `merge --config` writes nothing outside its output folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_lora, tiny_bert, two_domains
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from pm_hf.commands.cli import main as cli_main
from pm_hf.hub.card_text import HEAD_RULE
from pm_hf.hub.posthoc_inputs import same_model

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "data" / "tiny-bert")
IDS = torch.arange(5, 29).view(3, 8)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    """Adapters saved with `from_pretrained("data/tiny-bert")` name their base relative to where they were made."""
    monkeypatch.chdir(REPO)


def peft_adapter(folder, seed: int, base: str = BASE, num_labels: int | None = None, **lora) -> str:
    """A SEQ_CLS adapter as plain PEFT saves it, with random LoRA factors and a head moved away from the base's."""
    torch.manual_seed(seed)
    extra = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    model = AutoModelForSequenceClassification.from_pretrained(base, **extra)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], **lora}
    peft = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **config))
    randomize_lora(peft, seed=seed + 1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape) * 0.3)
    peft.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters of 2 and two of 4 classes; the first of each pair names its base `data/tiny-bert` (relative)."""
    out, pairs = tmp_path_factory.mktemp("peft_adapters"), {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        for labels in (None, 4):
            pairs[labels] = [peft_adapter(out / f"{labels}_{i}", i, base, labels) for i, base in
                             enumerate(("data/tiny-bert", BASE))]  # fmt: skip
    assert json.loads(Path(pairs[None][0], "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "data/tiny-bert"
    )
    return pairs


def reference(adapters, alphas, num_labels: int | None = None):
    """base + sum_t alpha_t (lora_alpha / r) B_t A_t, and the head the plain average of the adapters' heads."""
    extra = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    model = AutoModelForSequenceClassification.from_pretrained(BASE, **extra).eval()
    params, heads = dict(model.named_parameters()), []
    with torch.no_grad():
        for folder, alpha in zip(adapters, alphas):
            config = json.loads(Path(folder, "adapter_config.json").read_text())
            saved = {
                k.replace("base_model.model.", ""): v
                for k, v in load_file(f"{folder}/adapter_model.safetensors").items()
            }
            for name, A in saved.items():
                if ".lora_A." in name:
                    B = saved[name.replace("lora_A", "lora_B")]
                    params[name.replace(".lora_A", "")] += alpha * config["lora_alpha"] / config["r"] * B @ A
            heads.append({k: v for k, v in saved.items() if "lora_" not in k})
        assert sorted(heads[0]) == ["classifier.bias", "classifier.weight"]
        for key in heads[0]:
            params[key].copy_(sum(h[key] for h in heads) / len(heads))
    return model, {k: sum(h[k] for h in heads) / len(heads) for k in heads[0]}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits


@pytest.mark.parametrize("labels,scale", [(None, 0.7), (4, 0.5)])
def test_plain_peft_classifiers_merge_without_data(adapters, labels, scale, tmp_path, capsys):
    """Task arithmetic on the LoRA weights, the heads averaged; 4 classes on a 2-class base: a head of 4 classes."""
    pair, out = adapters[labels], tmp_path / "merged"
    argv = ["merge", "--adapters", *pair, "--merge_method", "task-arithmetic", "--merge_scale", str(scale)]
    assert cli_main([*argv, "--output", str(out)]) == 0
    info = json.loads((out / "pm_hf_export.json").read_text())
    assert info["alphas"] == [scale, scale] and info["head_rule"] == HEAD_RULE
    assert "classifier" in info["modules_to_save"] and info["base_model"] == BASE
    expected, head = reference(pair, [scale, scale], labels)
    merged = load_file(str(out / "adapter_model.safetensors"))
    for key, value in head.items():  # the merged head by hand: the adapters' heads averaged
        torch.testing.assert_close(merged[f"base_model.model.{key}"], value, atol=1e-6, rtol=1e-6)
    extra = {} if labels is None else {"num_labels": labels, "ignore_mismatched_sizes": True}
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE, **extra), str(out))
    torch.testing.assert_close(logits(model), logits(expected), atol=1e-5, rtol=1e-5)
    own = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(out / "base"), str(out))
    torch.testing.assert_close(logits(own), logits(expected), atol=1e-5, rtol=1e-5)
    assert f"In the merge, {HEAD_RULE}." in (out / "README.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["merge", "--help"])
    assert "plain average of the adapters' copies" in " ".join(capsys.readouterr().out.split())


def test_a_relative_and_an_absolute_path_are_one_base(adapters):
    assert same_model("data/tiny-bert", BASE) and same_model(BASE, str(Path(BASE) / ".." / "tiny-bert"))
    assert not same_model("data/tiny-bert", "data/tiny-bert-elsewhere") and same_model("org/model", "org/model")


def _other_base(folder: Path) -> str:
    shutil.copytree(BASE, folder)
    return str(folder)


MISMATCHES = {  # field: how the second adapter differs from the first
    "base_model_name_or_path": lambda tmp: {"base": _other_base(tmp / "other_base")},
    "classifier.weight": lambda tmp: {"num_labels": 3},
    "target_modules": lambda tmp: {"target_modules": ["query"]},
    "r": lambda tmp: {"r": 2},
    "lora_alpha": lambda tmp: {"lora_alpha": 4},
}


@pytest.mark.parametrize("field", [*MISMATCHES, "task_type"])
def test_each_mismatch_names_its_field_and_writes_nothing(adapters, field, tmp_path, capsys):
    first = adapters[None][0]
    if field == "task_type":  # a token classifier's adapter of the same layers
        second = shutil.copytree(adapters[None][1], tmp_path / "second")
        config = json.loads((second / "adapter_config.json").read_text())
        (second / "adapter_config.json").write_text(json.dumps({**config, "task_type": "TOKEN_CLS"}))
    else:
        second = peft_adapter(tmp_path / "second", 5, **MISMATCHES[field](tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli_main(["merge", "--adapters", first, str(second), "--merge_method", "ties", "--output", str(tmp_path / "m")])
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.startswith(f"pm-hf: error: {field} = "), message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder, nothing else


def test_an_adapter_folder_without_its_weights_is_named(adapters, tmp_path, capsys):
    """Before: `its adapter weights cannot be read (HFValidationError)`, the folder taken for a Hub id."""
    second = shutil.copytree(adapters[None][1], tmp_path / "second")
    (second / "adapter_model.safetensors").unlink()
    with pytest.raises(SystemExit) as err:
        cli_main(["merge", "--adapters", adapters[None][0], str(second), "--merge_method", "ties",
                  "--output", str(tmp_path / "m")])  # fmt: skip
    message = capsys.readouterr().err
    assert (
        err.value.code == 2
        and message.startswith("pm-hf: error: adapters = ")
        and ": holds no adapter_model" in message
    )
    assert not (tmp_path / "m").exists()


def test_adapters_that_do_not_fit_their_base_are_refused_before_loading(adapters, tmp_path, capsys):
    """Two adapters that name another base (hidden size 16, not 32): the first adapted weight's shape is refused."""
    tiny_bert(num_labels=2).save_pretrained(tmp_path / "small")
    moved = []
    for i, folder in enumerate(adapters[None]):
        moved.append(shutil.copytree(folder, tmp_path / f"adapter_{i}"))
        config = json.loads((moved[-1] / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "small")
        (moved[-1] / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        cli_main(["merge", "--adapters", *map(str, moved), "--merge_method", "ties", "--output", str(tmp_path / "m")])
    message = capsys.readouterr().err
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert err.value.code == 2 and message.startswith(f"pm-hf: error: {key} = [32, 32]: "), message
    assert "the base model" in message and "is [16, 16]" in message and not (tmp_path / "m").exists()


def _config(tmp_path: Path, out: Path) -> str:
    """A data config of two domains of the same 4 classes on the tiny BERT (by absolute path)."""
    config = {
        "model_name_or_path": BASE, "task_datasets": two_domains(tmp_path / "data"), "scenario": "domain_incremental",
        "max_train_samples_per_class": 4, "max_eval_samples_per_class": 4, "max_length": 16, "fisher_max_samples": 8,
        "output_dir": str(out), "report_to": "none", "use_cpu": True, "disable_tqdm": True,
    }  # fmt: skip
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_merge_with_data_writes_nothing_outside_its_output(adapters, tmp_path, capsys):
    """The config's output_dir is left as it was (no lock, no run folder); a head of the wrong size is refused."""
    config_out = tmp_path / "config_out"
    config_out.mkdir()
    (config_out / "keep.txt").write_text("mine")
    config = _config(tmp_path, config_out)
    listing = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))  # noqa: E731
    before = listing()
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:  # 2-class heads for 4 classes
        cli_main(["merge", "--adapters", *adapters[None], "--config", config, "--output", str(tmp_path / "bad")])
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.startswith("pm-hf: error: classifier.weight = [2, 32]"), message
    assert listing() == before
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapters", *adapters[4], "--config", config, "--output", str(out)]) == 0
    assert sorted(p for p in listing() if not p.startswith("merged")) == before
    results = json.loads((out / "results.json").read_text())  # it names the output, not the temporary run folder
    assert results["output_dir"] == results["config"]["PMConfig"]["output_dir"] == str(out)
    assert len(results["accuracy_matrix"]) == 2 and (out / "adapter_model.safetensors").is_file()
    assert "with each adapter's task data" in (out / "README.md").read_text()
    with pytest.raises(SystemExit) as err:  # a device this machine lacks: named before anything loads
        cli_main(["merge", "--adapters", *adapters[4], "--config", config, "--output", str(tmp_path / "gpu"),
                  "--fisher_device", "cuda:99"])  # fmt: skip
    assert err.value.code == 2 and "fisher_device = 'cuda:99'" in capsys.readouterr().err
    unused = yaml.safe_load(Path(config).read_text())
    unused.pop("output_dir")  # not used by a merge, so not required (before: `output_dir = None: required`)
    Path(config).write_text(yaml.safe_dump(unused))
    assert cli_main(["merge", "--adapters", *adapters[4], "--config", config, "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["accuracy_matrix"] == results["accuracy_matrix"]


def test_merge_adapters_from_python_never_replaces_other_files(adapters, tmp_path):
    """As `pm-hf merge`: a file at `output`, or a folder of other files, is refused before anything is loaded (it was
    replaced by the export); a string of adapters is not split into characters."""
    from pm_hf.config.groups import MergeArguments
    from pm_hf.errors import InputError
    from pm_hf.run.posthoc import merge_adapters

    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    ties = MergeArguments(merge_method="ties")
    for output in ("a-file", "folder"):
        with pytest.raises(InputError, match=r"^output = "):
            merge_adapters(adapters[None], tmp_path / output, ties)
    assert (tmp_path / "a-file").read_text() == "mine" and (tmp_path / "folder" / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match=r"^adapters = .*: give a list"):
        merge_adapters(adapters[None][0], tmp_path / "m", ties)
