"""Model cards right for every output (`pm_hf.hub.card`), on exports written directly from tiny models: an adapter
export
gets a PEFT card, a merged export a Transformers card used through `pipeline`/`AutoModelFor...`; `base_model` is the
Hub id when the base came from the Hub (also from a snapshot of the HF cache) and absent for a local base; the Hub
datasets, the framework versions and typed metrics are recorded; only images present in the folder are linked. The
post-hoc merge's card is checked in test_posthoc.py, a run's own exports in test_export.py and test_hub.py."""

import copy
import json

import pytest
from card_checks import check_card
from conftest import randomize_lora, tiny_bert, tiny_llama
from huggingface_hub import snapshot_download
from peft import LoraConfig, get_peft_model

from pm_hf.hub.export import ExportSpec, task_record, write_export
from pm_hf.hub.origin import IN_MEMORY, base_reference, hub_origin, resolve_base
from pm_hf.method.adapters import adapter_factors

HUB_BASE = "sentence-transformers/all-MiniLM-L6-v2"
RESULTS = {
    "tasks": ["task 1: joy", "task 2: fear"],
    "primary_metric": "accuracy",
    "accuracy_matrix": [[0.9, None], [0.8, 0.7]],
    **{"acc": 0.75, "aaa": 0.8, "bwt": -0.1, "forgetting": 0.1, "alphas": [1.0, 0.6], "alphas_raw": [1.0, 0.55]},
    "config": {
        "DataArguments": {"dataset_name": "dair-ai/emotion"},
        "PMConfig": {"perturbation": "task_vector", "perturb_eps": 0.5, "learning_rate": 2e-2, "seed": 3},
        "LoraArguments": {"r": 2, "lora_alpha": 4},
        "MergeArguments": {"merge_method": "pm", "head_align": "none"},
    },
}


def _export(tmp_path, base_name, task="sequence_classification", merged=False, plots=()):
    base = tiny_bert(num_labels=4) if task != "causal_lm" else tiny_llama()
    targets = ["query", "value"] if task != "causal_lm" else ["q_proj", "v_proj"]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=targets))
    randomize_lora(model)
    record = task_record(adapter_factors(model), dict.fromkeys(adapter_factors(model), 0.7))
    info = {"merge_method": "pm", "tasks": RESULTS["tasks"], "alphas": RESULTS["alphas"]}
    spec = ExportSpec(base_name, None, task, [], None, info)
    folder = tmp_path / ("merged" if merged else "adapter")
    write_export(base, [record], {}, spec, folder, merged, RESULTS, plots)
    return folder


@pytest.mark.parametrize("merged", [False, True])
def test_an_export_from_a_hub_base_names_it_and_its_datasets(tmp_path, merged):
    (tmp_path / "accuracy_matrix.png").write_bytes(b"png")  # one plot of the two exists
    folder = _export(tmp_path, HUB_BASE, merged=merged, plots=[tmp_path / "accuracy_matrix.png"])
    card = check_card(folder)
    data = card.data
    assert data.base_model == HUB_BASE and data.datasets == ["dair-ai/emotion"]
    assert data.pipeline_tag == "text-classification"
    types = {r.metric_name: r.metric_type for r in data.eval_results}
    assert types == {"ACC": "accuracy", "AAA": "accuracy", "BWT": "backward_transfer", "forgetting": "forgetting"}
    assert {r.dataset_type for r in data.eval_results} == {"dair-ai/emotion"}
    assert "![accuracy matrix](accuracy_matrix.png)" in card.text and "accuracy_curve.png" not in card.text
    info = json.loads((folder / "pm_hf_export.json").read_text())
    assert info["hub_id"] == HUB_BASE and set(info["versions"]) >= {"pm_hf", "transformers", "peft", "torch"}
    if merged:
        assert data.library_name == "transformers" and "peft" not in data.tags
        assert 'pipeline("text-classification", model=' in card.text
        assert "AutoModelForSequenceClassification.from_pretrained(" in card.text and "Peft" not in card.text
    else:
        assert data.library_name == "peft" and "peft" in data.tags
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
        assert "PeftModel.from_pretrained(base," in card.text and "load_export" in card.text


def test_a_local_base_is_named_in_the_text_not_the_metadata(tmp_path):
    local = tmp_path / "my-bert"
    tiny_bert(num_labels=4).save_pretrained(local)
    folder = _export(tmp_path, str(local))
    card = check_card(folder)
    assert card.data.base_model is None and "base_model" not in card.data.to_dict()
    assert f"a local model (`{local}`" in card.text


def test_a_causal_lm_adapter_names_its_base_by_hub_id_or_absolute_path(tmp_path, monkeypatch):
    folder = _export(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M", task="causal_lm")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    card = check_card(folder)
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert 'AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")' in card.text
    (tmp_path / "models" / "llm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    folder = _export(tmp_path / "local", "models/llm", task="causal_lm")  # relative to the working directory
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "models" / "llm")
    assert check_card(folder).data.base_model is None


def test_where_a_base_comes_from(tmp_path):
    snapshot = snapshot_download(HUB_BASE, local_files_only=True)  # seeded into the HF cache by conftest
    assert hub_origin(snapshot)[0] == HUB_BASE and base_reference(snapshot)[0] == HUB_BASE
    assert hub_origin("gpt2", "v1") == ("gpt2", "v1") and hub_origin(str(tmp_path)) is None
    assert hub_origin("./not/a/repo") is None and base_reference(str(tmp_path)) == (str(tmp_path), None)
    assert hub_origin(IN_MEMORY) is None and base_reference(IN_MEMORY) == (IN_MEMORY, None)  # a model object
    (tmp_path / "base").mkdir()
    assert resolve_base(tmp_path, "base") == str(tmp_path / "base") and resolve_base(tmp_path, "gpt2") == "gpt2"


def test_the_card_keeps_the_base_models_licence_where_its_card_is_at_hand(tmp_path):
    """A Hub base's licence from its card in the HF cache (all-MiniLM-L6-v2: Apache-2.0); a local base's from its
    folder's README.md, 'other' with its name and link; none claimed where the base has no card here."""
    assert check_card(_export(tmp_path / "hub", HUB_BASE)).data.license == "apache-2.0"
    local = tmp_path / "my-bert"
    tiny_bert(num_labels=4).save_pretrained(local)
    assert "license" not in check_card(_export(tmp_path / "bare", str(local))).data.to_dict()
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: my-terms\nlicense_link: LICENSE\n---\nhi\n")
    data = check_card(_export(tmp_path / "other", str(local))).data
    assert (data.license, data.license_name, data.license_link) == ("other", "my-terms", "LICENSE")
    from pm_hf.hub.card import base_license

    assert base_license({"hub_id": None, "base_model": str(tmp_path / "gone")}) == {}  # a base no longer there
    assert base_license({"hub_id": "not/a/valid/id", "base_model": "x"}) == {}  # the cache cannot name it


@pytest.mark.parametrize(("method", "pm_config", "tagged"), [
    ("pm", {"perturbation": "none"}, True),  # P&M's rule
    ("validated-alpha", {"perturbation": "task_vector", "perturb_eps": 0.5}, True),  # the preset: P&M's training
    ("validated-alpha", {"perturbation": "none", "perturb_eps": 0.5}, False),
    ("coma", {"perturbation": "task_vector", "perturb_eps": 0.0}, False),
    ("ties", {"perturbation": "task_vector", "perturb_eps": 0.5}, "posthoc"),  # a merge's data config: none ran
])  # fmt: skip
def test_the_perturb_and_merge_tag_follows_what_ran(method, pm_config, tagged):
    from pm_hf.hub.card import card_data

    results = {**RESULTS, "config": {**RESULTS["config"], "PMConfig": pm_config,
                                     "MergeArguments": {"merge_method": method}}}  # fmt: skip
    info = {"task": "sequence_classification", **({"merged_adapters": ["a", "b"]} if tagged == "posthoc" else {})}
    tags = card_data(results, info, None).tags
    assert ("perturb-and-merge" in tags) == (tagged is True)
