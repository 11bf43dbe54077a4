"""The accuracy-suite runner of scripts/benchmark.py on a tiny BERT: per-run JSON, resumability, the table."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import DATA

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_of_the_suites_is_a_registered_config(bench):
    from pm_hf.commands.parsing import parse_config

    for name, (overrides, _) in bench.METHODS.items():
        values = bench._resolve({**overrides, "output_dir": "/tmp/x"}, bench.SUITES["text-cil"])
        groups = parse_config(bench.SUITES["text-cil"], bench._overrides(values))
        assert groups[5].merge_method == overrides["merge_method"], name


def test_the_slow_learner_trains_the_backbone_at_a_hundredth_and_the_head_at_the_suite_rate(bench):
    from pm_hf.commands.parsing import parse_config

    for suite in ("text-cil", "vision-cil"):  # learning rates 5e-3 and 2e-3
        values = bench._resolve({**bench.METHODS["slow-proto"][0], "output_dir": "/tmp/x"}, bench.SUITES[suite])
        args = parse_config(bench.SUITES[suite], bench._overrides(values))[2]
        lr = {"text-cil": 5e-3, "vision-cil": 2e-3}[suite]
        assert args.learning_rate == pytest.approx(lr / 100) and args.head_learning_rate == lr
    values = bench._resolve({**bench.METHODS["slow-proto"][0], "learning_rate": 1e-2}, bench.SUITES["text-cil"])
    assert values["learning_rate"] == pytest.approx(1e-4) and values["head_learning_rate"] == 1e-2  # an override


def test_only_the_preset_merges_the_first_task_by_its_move(bench):
    """`validation_first_alpha` became 0.5 in stop 44 and `validation_first_move_limit` 5 in stop 47: `pm-validated`
    (the preset) takes both, `pm-validated-half` (its runs of stops 44 to 46) the 0.5 without the limit, and every
    other validated-alpha method, whose committed runs were made with the first task at 1, resolves to 1 still."""
    from pm_hf.commands.parsing import parse_config
    from pm_hf.method.strategies import build_strategy

    validated = [name for name, (o, _) in bench.METHODS.items() if o["merge_method"] == "validated-alpha"]
    assert {"pm-validated", "pm-validated-half", "pm-validated-first-1", "pm-validated-exact"} <= set(validated)
    for name in validated:
        values = bench._resolve({**bench.METHODS[name][0], "output_dir": "/tmp/x"}, bench.SUITES["text-cil"])
        strategy = build_strategy(parse_config(bench.SUITES["text-cil"], bench._overrides(values))[5])
        first = (strategy.validation_first_alpha, strategy.validation_first_move_limit)
        expected = {"pm-validated": (0.5, 5.0), "pm-validated-half": (0.5, None)}.get(name, (1.0, first[1]))
        assert first == expected, name


def test_the_runner_resolves_osf_and_olora(bench):
    """`--methods osf olora`: registered strategies with O-LoRA's lambda_1 = 0.5 (lambda_2 = 0), OSF's backbone at
    0.05 x the suite's learning rate (PEFT's OSF docs: 1e-5..1e-4) and the head at the suite's rate."""
    from pm_hf.commands.parsing import parse_config
    from pm_hf.method.strategies import build_strategy
    from pm_hf.method.strategies.olora import OLoRA
    from pm_hf.method.strategies.osf import OSF

    assert {"osf", "olora"} <= set(bench.METHODS)  # what `--methods` accepts
    for suite, lr in (("text-cil", 5e-3), ("vision-cil", 2e-3), ("vision-cil-10", 2e-3)):
        for name, cls in (("osf", OSF), ("olora", OLoRA)):
            values = bench._resolve({**bench.METHODS[name][0], "output_dir": "/tmp/x"}, bench.SUITES[suite])
            groups = parse_config(bench.SUITES[suite], bench._overrides(values))
            strategy = build_strategy(groups[5])
            assert type(strategy) is cls and groups[2].perturbation == "none"
            scale = 0.05 if name == "osf" else 1.0
            assert groups[2].learning_rate == pytest.approx(lr * scale), (suite, name)
        assert (strategy.olora_lambda, strategy.olora_l2) == (0.5, 0.0)


def test_runner_writes_runs_skips_finished_ones_and_tabulates(bench, model_dir, tmp_path, monkeypatch):
    config = ROOT / "configs" / "ci_tiny.yaml"
    extra = {
        "model_name_or_path": model_dir,
        "data_files": {"train": str(DATA / "train.parquet"), "test": str(DATA / "test.parquet")},
        "use_cpu": True,
        "disable_tqdm": True,
    }
    table = {"seq-merge": bench.METHODS["seq-merge"], "average": bench.METHODS["average"]}
    out, work = tmp_path / "results", tmp_path / "work"
    written = bench.run_accuracy(config, list(table), [0, 1], out, work, extra, table)
    assert [p.relative_to(out).as_posix() for p in written] == [
        "runs/seq-merge/seed0.json",
        "runs/seq-merge/seed1.json",
        "runs/average/seed0.json",
        "runs/average/seed1.json",
    ]
    run = json.loads(written[2].read_text())
    assert run["method"] == "average" and run["alphas"] == [1.0, 0.5]
    assert "config" in run and len(json.dumps(run)) < 20_000  # compact: no weights, no full config dump
    assert bench.run_accuracy(config, list(table), [0, 1], out, work, extra, table) == []  # all finished: skipped
    summary = bench.summarize_accuracy(out, order=list(table))
    assert list(summary) == ["seq-merge", "average"]
    accs = [json.loads((out / "runs" / "average" / f"seed{s}.json").read_text())["acc"] for s in (0, 1)]
    assert summary["average"]["acc"]["mean"] == pytest.approx(sum(accs) / 2)
    table_md = (out / "table.md").read_text()
    assert table_md.count("\n") == 4 and "| average |" in table_md
    assert (out / "curves.png").stat().st_size > 1000
    assert "recommended" not in json.loads((out / "summary.json").read_text())
    bench.summarize_accuracy(out, recommended="average")  # a suite's recommended method is named in summary.json
    assert json.loads((out / "summary.json").read_text())["recommended"] == "average"
    assert (out / "table.md").read_text() == table_md  # the table is the same
    with pytest.raises(ValueError, match="'pm' has no runs"):
        bench.summarize_accuracy(out, recommended="pm")
    # the runner's summary names a suite's recommended method only where the folder holds runs of it
    monkeypatch.setitem(bench.RECOMMENDED, "some-suite", "average")
    assert bench.recommendation("some-suite", out) == "average"
    monkeypatch.setitem(bench.RECOMMENDED, "some-suite", "pm")
    assert bench.recommendation("some-suite", out) is None and bench.recommendation("other-suite", out) is None


def test_alpha_table_bars_by_hand():
    spec = importlib.util.spec_from_file_location("alpha_table", ROOT / "scripts" / "alpha_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    accs = {"p": [70.0, 72.0], "coma-proto": [71.0], "fixed-1-eps-proto": [69.0], "sqrt-t-proto": [60.0],
            "slow-proto": [70.5], "seq-proto": [50.0], "frozen-proto": [70.0], "osf": [40.0], "olora": [41.0],
            "oracle-alpha-proto": [71.5, 72.5]}  # fmt: skip
    assert table.check_bars(accs, "p") == []  # mean 71 >= 71, 69, 60, 70.5, ...; oracle 72 is 1.0 above: within
    accs["oracle-alpha-proto"] = [72.5]
    accs["coma-proto"] = [71.5]
    accs["slow-proto"] = [73.0]
    assert table.check_bars(accs, "p") == ["< coma-proto by 0.5", "< slow-proto by 2.0", "1.5 below oracle-alpha-proto"]
    expected = [f"{m} missing" for m in (*table.FLOOR, *table.RIVALS, table.ORACLE)]
    assert table.check_bars({"p": [1.0]}, "p") == expected
    assert table.check_bars({}, "p") == ["no p run"]


def test_the_long_llm_suite_trains_100_steps_per_task_and_the_sweep_sets_eps(bench):
    """`llm-instruct-long` (issue 24's LLM track): 4 tasks of 400 samples, 2 epochs of batch 8 = 100 optimizer steps per
    task (the regime asks for at least 80), as the Trainer counts them; the sweep's methods set only eps."""
    from pm_hf.commands.parsing import parse_config
    from pm_hf.commands.preflight import optimizer_steps

    suite = bench.SUITES["llm-instruct-long"]
    for name, eps in (("pm", 0.5), ("pm-eps-0.25", 0.25), ("pm-eps-0.1", 0.1)):
        data, args = parse_config(suite, bench._overrides(bench._resolve({**bench.METHODS[name][0]}, suite)))[1:3]
        assert (args.perturbation, args.perturb_eps, len(data.task_datasets)) == ("task_vector", eps, 4)
        assert optimizer_steps(data.max_train_samples, args) == 100

    # the LLM track's candidate differs from merge-only in the Fisher's normalisation only
    def parsed(method):  # (PMConfig, FisherArguments) of the method on this suite
        return parse_config(suite, bench._overrides(bench._resolve({**bench.METHODS[method][0]}, suite)))[2:5:2]

    (args, fisher), (_, base) = parsed("merge-only-fisher-mean"), parsed("merge-only")
    assert (args.perturbation, fisher.fisher_normalize, base.fisher_normalize) == ("none", "mean", "none")
