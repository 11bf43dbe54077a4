"""The continual loop end to end on a tiny BERT and the real WordNet data: outputs, head invariants, the exported
adapter, resume after a stop and after a crash mid-task, TensorBoard logging and re-evaluation."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import DATA, Recorder, checkpoint_tensors, groups, tiny_vit
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, TrainerCallback

from pm_hf.config.groups import LoraArguments, ModelArguments, RunConfig
from pm_hf.continual import build_loop, output_lock, run_continual
from pm_hf.run.runs import evaluate_run


def numbers(results):
    return {k: results[k] for k in ("accuracy_matrix", "alphas", "alphas_raw", "pre_merge_acc", "acc", "aaa")}


def saved_weights(out):
    return {k: v for k, v in checkpoint_tensors(out).items() if k.startswith("weights/")}


@pytest.fixture(scope="module")
def full_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, run_continual(*groups(model_dir, out)), None


def test_outputs_and_alpha(full_run):
    out, results, _ = full_run
    for key in (
        "tasks",
        "accuracy_matrix",
        "acc",
        "aaa",
        "bwt",
        "forgetting",
        "alphas",
        "alphas_raw",
        "pre_merge_acc",
        "timings",
        "config",
    ):
        assert key in results
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy_matrix"] == results["accuracy_matrix"]
    assert results["alphas"][0] == 1.0 and results["alphas_raw"][0] == pytest.approx(1.0, abs=1e-9)
    assert all(0.0 <= a <= 1.0 for a in results["alphas"])
    assert [len([v for v in row if v is not None]) for row in results["accuracy_matrix"]] == [1, 2, 3]
    assert set(results["timings"][0]) == {"train", "fisher", "merge", "eval"}
    for name in ("accuracy_matrix.png", "accuracy_curve.png", "merged_adapter/adapter_config.json"):
        assert (out / name).stat().st_size > 0


def test_old_head_rows_bit_identical_and_adapter_roundtrip(model_dir, tmp_path):
    recorder = Recorder()
    loop = build_loop(RunConfig(*groups(model_dir, tmp_path / "run")), callbacks=[recorder])
    loop.run()
    rows_after = recorder.params
    for t in range(1, 3):  # rows of classes of earlier tasks never change afterwards
        old = [c for g in ([0, 1], [2, 3], [4, 5])[:t] for c in g]
        for key in rows_after[0]:
            assert torch.equal(rows_after[t][key][old], rows_after[t - 1][key][old]), (t, key)
        new = ([0, 1], [2, 3], [4, 5])[t]
        assert not torch.equal(rows_after[t]["classifier.weight"][new], rows_after[t - 1]["classifier.weight"][new])

    # the exported adapter reproduces the merged model's logits
    loop.head.set_active(None)
    batch = loop.stream.collate_fn([loop.stream.tasks[0].eval[i] for i in range(4)])
    batch.pop("labels")
    loop.model.eval()
    expected = loop.model(**batch).logits
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=loop.stream.num_classes, ignore_mismatched_sizes=True
    )
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "merged_adapter")).eval()
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)


class CrashAt(TrainerCallback):
    """Raises in the middle of the given task's training (simulates a kill)."""

    def __init__(self, trainer_count_to_crash: int, step: int = 2):
        self.calls, self.target, self.step = 0, trainer_count_to_crash, step

    def on_train_begin(self, args, state, control, **kw):
        self.calls += 1

    def on_step_end(self, args, state, control, **kw):
        if self.calls == self.target and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill in the middle of task 3")


# slow tier (three runs beside the shared one); the default tier keeps a stop between tasks resumed to the same run
# (test_reliability's resume test) and a crash within a task's training and within a checkpoint write resumed to
# identical results (test_reliability's fault sweep, its two default points)
@pytest.mark.slow
def test_resume_after_stop_and_after_crash_matches_uninterrupted(model_dir, tmp_path, full_run):
    ref_out, ref, _ = full_run
    ref_weights = saved_weights(ref_out)

    out = tmp_path / "stopped"
    run_continual(*groups(model_dir, out), stop_after=2)
    assert json.loads((out / "latest.json").read_text())["completed"] == 2
    resumed = run_continual(*groups(model_dir, out), resume=True)
    assert numbers(resumed) == numbers(ref)

    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run_continual(*groups(model_dir, out), callbacks=[CrashAt(3)])
    assert json.loads((out / "latest.json").read_text())["completed"] == 2  # task 3's state never half-written
    resumed = run_continual(*groups(model_dir, out), resume=True)
    assert numbers(resumed) == numbers(ref)
    for key, value in saved_weights(out).items():
        assert torch.equal(value, ref_weights[key]), key


def test_evaluate_run_reproduces_last_row(full_run):
    out, results, _ = full_run
    before = json.loads((out / "results.json").read_text())
    again = evaluate_run(str(out))
    assert again["last_row"] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-9)
    assert json.loads((out / "results.json").read_text()) == before  # the run's record, not this process's view
    assert again["acc"] == pytest.approx(results["acc"], abs=1e-9)


def test_constant_alpha_and_tensorboard(model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = groups(
        model_dir,
        tmp_path,
        merge_method="coma",
        fixed_alpha=1.0,
        perturbation="none",
        report_to=["tensorboard"],
        class_groups=[[0, 1], [2, 3]],
    )
    results = run_continual(*args)
    assert results["alphas"] == [1.0, 1.0]
    assert results["branch_counts"][0] == {"0": 4}  # 32 samples / batch 8, every step unperturbed
    tags = set()
    for events in tmp_path.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval/continual/alpha", "eval/continual/acc_seen", "train/loss"} <= tags, sorted(tags)


def test_build_loop_rejects_bad_modules(model_dir, tmp_path):
    args = list(groups(model_dir, tmp_path))
    args[3] = LoraArguments(r=4, modules_to_save=["no_such_module"])
    with pytest.raises(ValueError, match="no_such_module"):
        build_loop(RunConfig(*args))
    assert not (tmp_path / "latest.json").exists()


def test_cli_train_then_evaluate(model_dir, tmp_path, capsys):
    from pm_hf.commands.cli import main

    config = Path(__file__).parent.parent / "configs" / "ci_tiny.yaml"
    files = json.dumps({"train": str(DATA / "train.parquet"), "test": str(DATA / "test.parquet")})
    out = tmp_path / "cli_run"
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--model_name_or_path",
            model_dir,
            "--data_files",
            files,
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
        ]
    )
    assert code in (0, None)
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2 and "ACC" in printed and "alpha" in printed.lower()
    assert main(["evaluate", str(out)]) in (0, None)
    assert f"{100 * results['acc']:.1f}" in capsys.readouterr().out


def test_image_classification_loop_on_digits(tmp_path, monkeypatch):
    """A tiny ViT through the whole loop on scikit-learn's digits (8x8, real data shipped with scikit-learn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None]  # [N, 1, 8, 8] in [0, 1]
    frame = pd.DataFrame({"image": [img.tolist() for img in images], "label": digits.target})
    frame.iloc[::5].to_parquet(tmp_path / "test.parquet")
    frame.drop(frame.index[::5]).to_parquet(tmp_path / "train.parquet")
    tiny_vit(num_labels=2).save_pretrained(tmp_path / "vit")
    args = list(
        groups(
            str(tmp_path / "vit"),
            tmp_path / "out",
            class_groups=[[0, 1], [2, 3]],
            num_train_epochs=4,
            max_train_samples_per_class=64,
            learning_rate=5e-2,
            data_files={"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
        )
    )
    args[0] = ModelArguments(model_name_or_path=str(tmp_path / "vit"), model_task="image_classification")
    args[3] = LoraArguments(r=2)
    loop = build_loop(RunConfig(*args))
    by_hand = _score_before_each_merge(loop, monkeypatch)
    results = loop.run()
    assert results["alphas"][0] == 1.0 and len(results["accuracy_matrix"]) == 2
    assert results["pre_merge_acc"] == pytest.approx(by_hand, abs=1e-12)  # theta*_t scored over the seen classes
    # it learned each task: at least 12 of 16 rows right, over 2 classes then 4 (chance 1/2, 1/4), which a predictor
    # at chance reaches with probability 0.04 and 4e-5 (binomial tails)
    assert results["eval_sizes"] == [16, 16] and min(by_hand) >= 12 / 16


def _score_before_each_merge(loop, monkeypatch) -> list[float]:
    """The accuracy of theta*_t on task t's evaluation rows, argmax over the classes seen so far, computed here in
    one forward pass just before each merge (where the loop measures `pre_merge_acc`)."""
    import pm_hf.run.loop as loop_module

    real, scores = loop_module.merge_task, []

    def scoring(weights, strategy, context, **kw):
        tasks = loop.stream.tasks[: context.t + 1]
        seen = torch.tensor(sorted(c for task in tasks for c in task.classes))
        batch = loop.stream.collate_fn([tasks[-1].eval[i] for i in range(len(tasks[-1].eval))])
        labels, training = batch.pop("labels"), loop.model.training
        loop.model.eval()
        with torch.no_grad():
            predicted = seen[loop.model(**batch).logits[:, seen].argmax(-1)]
        loop.model.train(training)
        scores.append(float((predicted == labels).double().mean()))
        return real(weights, strategy, context, **kw)

    monkeypatch.setattr(loop_module, "merge_task", scoring)
    return scores


def test_a_second_process_on_the_same_output_dir_is_refused(model_dir, tmp_path):
    """Two processes writing one output_dir (e.g. a launcher whose ranks the training arguments do not see) fail at
    once instead of overwriting each other's checkpoints."""
    with output_lock(tmp_path / "out"):
        with pytest.raises(ValueError, match="in use by another pm_hf process"):
            run_continual(*groups(model_dir, tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".pm_hf.lock"]


def test_nested_timer_intervals_add_up_without_counting_twice():
    """An on-demand Fisher inside the merge is "fisher" time, not also "merge" time (`pm_hf.timing.Timer`)."""
    import time

    from pm_hf.timing import Timer

    timer, start = Timer("merge", "fisher"), time.perf_counter()
    with timer("merge"):
        time.sleep(0.02)
        with timer("fisher"):
            time.sleep(0.03)
    wall = time.perf_counter() - start
    assert timer.seconds["merge"] >= 0.02 and timer.seconds["fisher"] >= 0.03
    assert sum(timer.seconds.values()) == pytest.approx(wall, abs=5e-3)


TINY = dict(class_groups=[[0, 1], [2, 3]], max_train_samples_per_class=8, max_eval_samples_per_class=4)


def _record_merges(monkeypatch) -> list[dict]:
    """Wrap the loop's `merge_task`: per merge, each LoRA layer's base weight and s B A before it (theta*_t = their
    sum), its base weight after it, and the Fisher the strategy was given (read off the model, not the task vector)."""
    import pm_hf.run.loop as loop_module
    from pm_hf.method.adapters import active_adapter, lora_layers

    real, records = loop_module.merge_task, []

    def weights_of(model):
        name = active_adapter(model)
        out = {}
        for key, layer in lora_layers(model).items():
            delta = (layer.lora_B[name].weight @ layer.lora_A[name].weight).double() * layer.scaling[name]
            out[key] = (layer.get_base_layer().weight.detach().double().clone(), delta.detach())
        return out

    def recording(weights, strategy, context, **kw):
        before = weights_of(weights.model)
        plan = real(weights, strategy, context, **kw)
        after = {k: base for k, (base, _) in weights_of(weights.model).items()}
        fisher = context.made("fisher")
        records.append(
            {"before": before, "after": after, "fisher": fisher and {k: v.double() for k, v in fisher.items()}}
        )
        return plan

    monkeypatch.setattr(loop_module, "merge_task", recording)
    return records


def _ties_by_hand(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) on flat tensors: keep each tau's round(density n) largest magnitudes, elect the sign of
    the sum of the kept entries, average the kept entries of that sign."""
    kept = []
    for tau in taus:
        flat = tau.flatten()
        keep = torch.zeros_like(flat)
        top = flat.abs().topk(max(1, round(density * flat.numel()))).indices
        keep[top] = flat[top]
        kept.append(keep)
    stacked = torch.stack(kept)
    sign = stacked.sum(0).sign()
    agree = (stacked.sign() == sign) & (stacked != 0)
    mean = (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)
    return mean.reshape(taus[0].shape)


def test_ties_through_the_loop_deploys_theta0_plus_the_ties_merge_of_the_trained_models(
    model_dir, tmp_path, monkeypatch
):
    records = _record_merges(monkeypatch)
    density, scale = 0.3, 0.7
    run_continual(*groups(model_dir, tmp_path, merge_method="ties", merge_scale=scale, ties_density=density,
                          **TINY))  # fmt: skip
    theta0 = {
        k: p.detach().double()
        for k, p in AutoModelForSequenceClassification.from_pretrained(model_dir).named_parameters()
    }
    assert len(records) == 2 and records[0]["before"]
    taus: dict[str, list] = {}
    for record in records:
        for key, (base, delta) in record["before"].items():
            assert torch.equal(base, theta0[key])  # every task starts from theta_0 (independent fine-tunes)
            taus.setdefault(key, []).append(base + delta - theta0[key])  # tau_t = theta*_t - theta_0
            expected = theta0[key] + scale * _ties_by_hand(taus[key], density)
            torch.testing.assert_close(record["after"][key], expected, rtol=1e-5, atol=1e-6, msg=key)
    conflicts = [(_ties_by_hand([t0], density) * _ties_by_hand([t1], density) < 0).any() for t0, t1 in taus.values()]
    assert any(conflicts)  # the second merge had signs to elect


@pytest.mark.slow  # (about 27 s; TIES, checked the same way, stays in the default tier)
def test_cofima_through_the_loop_writes_the_fisher_weighted_average(model_dir, tmp_path, monkeypatch):
    """theta_t = ((1 - a) S theta_{t-1} + a F_t theta*_t) / ((1 - a) S + a F_t), S the sum of the earlier Fishers
    (theta_{t-1} + a Delta_t where both are 0), per parameter of every adapted layer."""
    records = _record_merges(monkeypatch)
    a = 0.3
    run_continual(*groups(model_dir, tmp_path, merge_method="cofima", cofima_weight=a, **TINY))
    assert len(records) == 2 and records[0]["before"]
    S = {k: torch.zeros_like(base) for k, (base, _) in records[0]["before"].items()}
    for record in records:
        for key, (previous, delta) in record["before"].items():
            F, trained = record["fisher"][key], previous + delta
            den = (1 - a) * S[key] + a * F
            expected = torch.where(den > 0, ((1 - a) * S[key] * previous + a * F * trained) / den, previous + a * delta)
            torch.testing.assert_close(record["after"][key], expected, rtol=1e-5, atol=1e-6, msg=key)
            S[key] = S[key] + F
    F0, F1 = records[0]["fisher"], records[1]["fisher"]
    w = {k: a * F1[k] / ((1 - a) * F0[k] + a * F1[k]).clamp_min(1e-300) for k in F1}  # task 1's per-parameter weight
    assert any((w[k] - a).abs().max() > 0.05 for k in w)  # far from the constant a somewhere: the Fisher decides
