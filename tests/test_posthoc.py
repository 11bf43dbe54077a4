"""Post-hoc merge (`pm-hf merge`, `pm_hf.run.posthoc.merge_adapters`) on a tiny Llama: the per-task adapters of a P&M
run
merged with the run's data config give the run's merged model; a data-free strategy equals its closed form computed
by hand from the adapter files; adapters that do not belong together and strategies that need data are refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from card_checks import check_card
from conftest import llm_groups
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pm_hf.commands.cli import main as cli_main
from pm_hf.config.checks import InputError
from pm_hf.continual import run_continual
from pm_hf.run.posthoc import merge_adapters
from pm_hf.run.runs import load_export


@pytest.fixture(scope="module")
def run(llm_dir, tmp_path_factory):  # noqa: F811
    """A 2-task P&M run of the tiny Llama and its per-task adapters (`pm-hf export --mode per-task`)."""
    out = tmp_path_factory.mktemp("llm_run")
    results = run_continual(*llm_groups(llm_dir, out / "run"))
    assert cli_main(["export", str(out / "run"), "--mode", "per-task", "--output", str(out / "adapters")]) == 0
    return out, results, [str(out / "adapters" / f"task_{t}") for t in range(2)]


def _logits(folder) -> torch.Tensor:
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merging_a_runs_adapters_with_its_data_gives_the_runs_model(run, llm_dir, tmp_path):  # noqa: F811
    out, results, adapters = run
    info = merge_adapters(adapters, tmp_path / "merged", parsed=llm_groups(llm_dir, tmp_path / "posthoc_run"))
    assert info["alphas"] == pytest.approx(results["alphas"], abs=1e-6)
    assert not (tmp_path / "posthoc_run").exists()  # the config's output_dir: nothing written outside the output
    again = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert again["alphas_raw"] == pytest.approx(results["alphas_raw"], abs=1e-6)
    assert again["score_matrices"]["exact_match"] == results["score_matrices"]["exact_match"]
    torch.testing.assert_close(_logits(tmp_path / "merged"), _logits(out / "run" / "merged_adapter"), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    card = check_card(tmp_path / "merged")
    assert "merged in this order by `pm-hf merge` (`pm_hf`) with each adapter's task data" in card.text
    assert "the merge rule `pm`" in card.text and all(f"`{a}`" in card.text for a in adapters)
    assert card.data.eval_results and f"## Score matrix ({results['primary_metric']})" in card.text


def test_each_per_task_adapter_has_its_card(run):
    _, results, adapters = run
    for t, folder in enumerate(adapters):
        card = check_card(folder)
        assert card.data.library_name == "peft" and card.data.base_model is None  # the tiny Llama is local
        assert f"# Task {t + 1}'s LoRA adapter ({results['tasks'][t]})" in card.text
        assert "AutoPeftModelForCausalLM.from_pretrained(" in card.text


def test_a_data_free_merge_equals_its_closed_form(run, llm_dir, tmp_path, capsys):  # noqa: F811
    _, _, adapters = run
    argv = ["merge", "--adapters", *adapters, "--merge_method", "task-arithmetic", "--merge_scale", "0.7"]
    assert cli_main([*argv, "--output", str(tmp_path / "ta")]) == 0
    assert "alpha per task" in capsys.readouterr().out
    merged = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ta")).merge_and_unload()
    base = dict(AutoModelForCausalLM.from_pretrained(llm_dir).named_parameters())
    config = json.loads((tmp_path / "ta" / "pm_hf_export.json").read_text())
    assert config["alphas"] == [0.7, 0.7]
    card = check_card(tmp_path / "ta")  # the merge rule and its inputs; no score table, image or unset field
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None and not card.data.eval_results  # a local base; nothing evaluated
    assert "without data, with the merge rule `task-arithmetic`" in card.text and "- merge scale 0.7" in card.text
    assert all(f"{t + 1}. `{a}`" in card.text for t, a in enumerate(adapters)) and "![" not in card.text
    assert "| 1. " in card.text and "matrix" not in card.text and "trained a LoRA adapter" not in card.text
    expected = {}
    for folder in adapters:
        lora = json.loads(open(f"{folder}/adapter_config.json").read())
        scaling = lora["lora_alpha"] / lora["r"]
        weights = load_file(f"{folder}/adapter_model.safetensors")
        for name, A in weights.items():
            if "lora_A" in name:
                key = name.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                delta = scaling * weights[name.replace("lora_A", "lora_B")] @ A
                expected[key] = expected.get(key, 0) + 0.7 * delta
    params = dict(merged.named_parameters())
    assert expected
    for key, delta in expected.items():
        torch.testing.assert_close(params[key], base[key] + delta, atol=1e-6, rtol=1e-5)


def test_a_merged_causal_lm_adapter_loads_after_it_is_moved(run, llm_dir, tmp_path):  # noqa: F811
    """A causal LM's adapter names its local base by absolute path (a Hub base by id): a copy of the export loads
    elsewhere, with PEFT's AutoPeft class and pm_hf's loader, after the original is deleted."""
    _, _, adapters = run
    assert (
        cli_main(["merge", "--adapters", *adapters, "--merge_method", "average", "--output", str(tmp_path / "m")]) == 0
    )
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["base_model_name_or_path"] == llm_dir
    before = _logits(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "elsewhere" / "m")
    shutil.rmtree(tmp_path / "m")
    torch.testing.assert_close(_logits(tmp_path / "elsewhere" / "m"), before, atol=0, rtol=0)
    model = load_export(str(tmp_path / "elsewhere" / "m"))[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.arange(3, 19).view(2, 8)).logits, before, atol=1e-5, rtol=1e-5)


def test_strategies_that_need_data_and_foreign_adapters_are_refused(run, tmp_path, capsys):
    _, _, adapters = run
    with pytest.raises(SystemExit) as err:
        cli_main(["merge", "--adapters", *adapters, "--merge_method", "pm", "--output", str(tmp_path / "x")])
    assert err.value.code == 2 and "merge_method = 'pm': needs each adapter's task data" in capsys.readouterr().err
    validated = ["--merge_method", "validated-alpha", "--head_align", "prototypes", "--head_align_drift", "sdc"]
    with pytest.raises(SystemExit) as err:  # (its estimate and its first merge's move read held-out task data)
        cli_main(["merge", "--adapters", *adapters, *validated, "--output", str(tmp_path / "x")])
    assert "merge_method = 'validated-alpha': needs each adapter's task data" in capsys.readouterr().err
    assert err.value.code == 2 and not (tmp_path / "x").exists()
    config = json.loads(open(f"{adapters[1]}/adapter_config.json").read())
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] + 1}))
    with pytest.raises(SystemExit) as err:
        cli_main(["merge", "--adapters", adapters[0], str(other), "--output", str(tmp_path / "x")])
    assert err.value.code == 2 and f"pm-hf: error: r = {config['r'] + 1}: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_merge_launched_with_deepspeed_or_fsdp_is_refused(run, llm_dir, tmp_path):  # noqa: F811
    """`pm-hf merge` trains nothing: a DeepSpeed config (ZeRO-3 would partition the model as it loads, with no engine
    to gather it) or FSDP is refused before anything is loaded or written."""
    _, _, adapters = run
    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    for kw, field in (({"deepspeed": zero3}, "deepspeed"), ({"fsdp": "full_shard"}, "fsdp")):
        parsed = llm_groups(llm_dir, tmp_path / "posthoc_run", **kw)
        with pytest.raises(InputError, match=f"^{field} = .*trains nothing"):
            merge_adapters(adapters, tmp_path / "merged", parsed=parsed)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "posthoc_run").exists()


def test_a_run_merged_into_an_adapter_exports_each_tasks_own_adapter(run, llm_dir, tmp_path):  # noqa: F811
    """`merge_into: adapter` keeps the run's model as one merged adapter; `--mode per-task` still writes each task's
    trained adapter (before: the merged one, as a single `task_0`), the same as a run merged into the base weights."""
    _, _, adapters = run
    run_continual(*llm_groups(llm_dir, tmp_path / "run", merge_into="adapter"))
    assert cli_main(["export", str(tmp_path / "run"), "--mode", "per-task", "--output", str(tmp_path / "a")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["task_0", "task_1"]
    for t, folder in enumerate(adapters):  # the same training: the same factors as trained
        mine, theirs = (
            load_file(str(Path(f) / "adapter_model.safetensors")) for f in (tmp_path / "a" / f"task_{t}", folder)
        )
        assert mine.keys() == theirs.keys() and all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)
