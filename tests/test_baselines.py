"""The baselines of issue 4 through the real loop (tiny BERT, 3 class-incremental tasks): each rule's defining
property is checked on the saved state, not just that it runs."""

import numpy as np
import pytest
import torch
from conftest import Recorder, checkpoint_tensors, groups
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from pm_hf.config.groups import RunConfig
from pm_hf.continual import build_loop, run_continual
from pm_hf.heads.alignment import compensate_drift, fit_head_rows, sample_class_features, update_class_stats
from pm_hf.method.adapters import lora_layers


def _run(model_dir, out, **kw):
    kw.setdefault("class_groups", [[0, 1], [2, 3]])  # two tasks keep the suite fast; every property shows at t = 2
    return run_continual(*groups(model_dir, out, **kw))


def _run_with_head_rows(model_dir, out, **kw):
    """Run the loop and return (results, [the classifier's weight after each task])."""
    recorder = Recorder()
    results = run_continual(*groups(model_dir, out, class_groups=[[0, 1], [2, 3]], **kw), callbacks=[recorder])
    return results, [p["classifier.weight"] for p in recorder.params]


_checkpoint = checkpoint_tensors


def _pretrained(model_dir, num_labels=10):
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, ignore_mismatched_sizes=True
    )


def _weighted_last(results, t):
    row = np.array(results["accuracy_matrix"][t][: t + 1])
    sizes = np.array(results["eval_sizes"][: t + 1], dtype=float)
    return float(row @ sizes / sizes.sum())


def test_seq_is_one_continued_adapter(model_dir, tmp_path):
    """`seq`: the deployed model after task t IS the fine-tuned model of task t (no merge), and the adapter keeps
    training across tasks (its norm after task 2 differs from a fresh adapter's)."""
    results = _run(model_dir, tmp_path / "seq", merge_method="seq")
    for t in range(2):
        assert results["accuracy_matrix"][t][t] == pytest.approx(results["pre_merge_acc"][t], abs=1e-12)
    state = _checkpoint(tmp_path / "seq")
    assert any(k.startswith("strategy/adapter/") for k in state)
    # deployed LoRA weights = theta_0 + s * B @ A of the continued adapter (saved in the rule state)
    base = _pretrained(model_dir)
    params = dict(base.named_parameters())
    for key in [k for k in state if k.startswith("strategy/adapter/") and k.endswith("/A")]:
        mkey = key[len("strategy/adapter/") : -2]
        A, B = state[key], state[key[:-1] + "B"]
        deployed = state[f"weights/{mkey}"]
        delta = deployed - params[mkey].detach()
        # rank r: the deployed delta is exactly a multiple of B @ A
        ba = B @ A
        s = float((delta * ba).sum() / (ba * ba).sum())
        assert torch.allclose(delta, s * ba, atol=1e-5), mkey


@pytest.mark.slow  # (13 s; the closed form's resume equivalence stays in the default tier: test_continual.py)
def test_seq_resume_matches_uninterrupted(model_dir, tmp_path):
    full = _run(model_dir, tmp_path / "a", merge_method="seq", class_groups=[[0, 1], [2, 3], [4, 5]])
    args = groups(model_dir, tmp_path / "b", merge_method="seq", class_groups=[[0, 1], [2, 3], [4, 5]])
    run_continual(*args, stop_after=2)
    args = groups(model_dir, tmp_path / "b", merge_method="seq", class_groups=[[0, 1], [2, 3], [4, 5]])
    resumed = run_continual(*args, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_task_arithmetic_deploys_theta0_plus_scaled_sum(model_dir, tmp_path):
    out = tmp_path / "ta"
    results = _run(model_dir, out, merge_method="task-arithmetic", merge_scale=0.5)
    state = _checkpoint(out)
    params = dict(_pretrained(model_dir).named_parameters())
    sums = {k[len("strategy/sum/") :]: v for k, v in state.items() if k.startswith("strategy/sum/")}
    assert sums and results["alphas"] == [0.5, 0.5]
    for key, total in sums.items():
        theta0 = params[key].detach()
        assert torch.allclose(state[f"weights/{key}"], theta0 + 0.5 * total, atol=1e-6), key


def test_magmax_runs_and_keeps_its_state(model_dir, tmp_path):  # TIES and CoFiMA: by hand in test_continual.py
    mm = _run(model_dir, tmp_path / "mm", merge_method="magmax", merge_scale=1.0)
    state = _checkpoint(tmp_path / "mm")
    params = dict(_pretrained(model_dir).named_parameters())
    maxes = {k[len("strategy/max/") :]: v for k, v in state.items() if k.startswith("strategy/max/")}
    for key, m in maxes.items():
        assert torch.allclose(state[f"weights/{key}"], params[key].detach() + m, atol=1e-6), key
    assert len(mm["accuracy_matrix"]) == 2


def test_oracle_alpha_picks_the_best_grid_point(model_dir, tmp_path):
    results = _run(model_dir, tmp_path / "oracle", merge_method="oracle-alpha")
    assert results["alphas"][0] == 1.0 and results["oracle_scores"][0] is None
    for t in (1,):
        scores = {float(a): s for a, s in results["oracle_scores"][t].items()}
        assert len(scores) == 11
        best = max(scores.values())
        assert scores[results["alphas"][t]] == best
        assert min(a for a, s in scores.items() if s == best) == results["alphas"][t]
        # the merged model evaluated after the merge is the one scored for that alpha
        assert _weighted_last(results, t) == pytest.approx(best, abs=1e-12)


def test_joint_is_one_task_over_all_classes(model_dir, tmp_path):
    results = _run(model_dir, tmp_path / "joint", merge_method="joint")
    assert len(results["tasks"]) == 1 and results["tasks"][0].startswith("joint")
    assert results["eval_sizes"] == [2 * 2 * 8]


@pytest.mark.parametrize("method, knob", [("magmax", "merge_scale"), ("cofima", "cofima_weight")])
def test_dense_export_reproduces_the_merged_model(model_dir, tmp_path, method, knob):
    run = RunConfig(*groups(model_dir, tmp_path / method, merge_method=method, class_groups=[[0, 1], [2, 3]],
                            **{knob: 0.7}))  # fmt: skip
    loop = build_loop(run)
    loop.run()
    loop.head.set_active(None)
    batch = loop.stream.collate_fn([loop.stream.tasks[0].eval[i] for i in range(4)])
    batch.pop("labels")
    loop.model.eval()
    with torch.no_grad():
        expected = loop.model(**batch).logits
        loaded = PeftModel.from_pretrained(_pretrained(model_dir), str(tmp_path / method / "merged_adapter")).eval()
        got = loaded(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert lora_layers(loaded)


def test_fit_head_rows_moves_only_the_given_rows_and_lowers_the_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = torch.randint(2, 4, (64,))  # current task: classes 2, 3
    x[y == 2, 0] += 3.0
    x[y == 3, 0] -= 3.0
    weight, bias = torch.randn(4, 5) * 0.1, torch.zeros(4)

    def loss(w, b, classes):
        logits = x @ w[classes].T + b[classes]
        return torch.nn.functional.cross_entropy(logits, torch.tensor([classes.index(int(v)) for v in y])).item()

    for classes in ([2, 3], [0, 1, 2, 3]):
        w, b = fit_head_rows(x, y, weight, bias, rows=[2, 3], classes=classes, steps=50, lr=0.1)
        assert torch.equal(w[[0, 1]], weight[[0, 1]]) and torch.equal(b[[0, 1]], bias[[0, 1]])
        assert loss(w, b, classes) < 0.5 * loss(weight, bias, classes)
    with pytest.raises(ValueError, match="rows"):
        fit_head_rows(x, y, weight, bias, rows=[2, 3], classes=[0, 2], steps=1)


def test_head_alignment_in_the_loop_keeps_old_rows(model_dir, tmp_path):
    results, rows = _run_with_head_rows(model_dir, tmp_path / "al", merge_method="average", head_align="seen")
    assert torch.equal(rows[0][[0, 1]], rows[1][[0, 1]])
    assert results["timings"][1]["head_align"] > 0


def _class_stats_by_hand(x, y, num_classes):
    mean = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    scatter = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for c in range(num_classes):
        xc = x[y == c].double()
        if len(xc):
            mean[c], count[c] = xc.mean(0), len(xc)
            for row in xc:  # one outer product per sample
                scatter += torch.outer(row - mean[c], row - mean[c])
    return mean, count, scatter


def test_class_stats_merge_batches_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 2 + 1
    y = torch.tensor([0] * 10 + [1] * 12 + [2] * 8 + [1] * 6 + [4] * 4)  # class 1 spans two batches; 3 never seen
    stats = {}
    for lo, hi in ((0, 17), (17, 30), (30, 40)):
        stats = update_class_stats(stats, x[lo:hi], y[lo:hi], num_classes=5)
    mean, count, scatter = _class_stats_by_hand(x, y, 5)
    assert torch.equal(stats["count"], count.float())
    torch.testing.assert_close(stats["mean"], mean.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["scatter"], scatter.float(), atol=1e-5, rtol=1e-6)
    assert stats["mean"].shape == (5, 3) and stats["scatter"].shape == (3, 3)  # fixed size, whatever the tasks


def test_sampled_class_features_follow_the_stored_gaussians():
    means = torch.tensor([[0.0, 0.0], [5.0, -5.0], [9.0, 9.0]])
    cov = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    counts = torch.tensor([50.0, 50.0, 0.0])
    stats = {"mean": means, "count": counts, "scatter": cov * (counts.sum() - 2)}  # pooled over classes 0, 1
    x, y = sample_class_features(stats, [0, 1], n_per_class=20000, seed=1, shrinkage=0.0)
    assert x.shape == (40000, 2) and torch.equal(torch.bincount(y), torch.tensor([20000, 20000]))
    for c in (0, 1):
        xc = x[y == c]
        torch.testing.assert_close(xc.mean(0), means[c], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(xc.T), cov, atol=0.05, rtol=0)
    x1, _ = sample_class_features(stats, [0, 1], n_per_class=5, seed=1)
    x2, _ = sample_class_features(stats, [0, 1], n_per_class=5, seed=1)
    assert torch.equal(x1, x2)  # seeded
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        sample_class_features(stats, [0, 2], n_per_class=2)


def test_drift_compensation_by_hand():
    import math

    means = torch.tensor([[0.0], [10.0], [-4.0]])
    before, after = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [3.0]])  # drifts 1 and 0
    out = compensate_drift(means, [0, 1], before, after)
    # class 0: squared distances 1, 9; scale = median = 1 (torch takes the lower middle); w = softmax(-[1, 9] / 2)
    assert out[0].item() == pytest.approx(1 / (1 + math.exp(-4)), abs=1e-6)
    # class 1: distances 81, 49, scale 49: w = softmax(-[81, 49] / 98), drift of the nearer sample (0) weighs more
    w = 1 / (1 + math.exp((81 - 49) / 98))
    assert out[1].item() == pytest.approx(10 + w * 1.0, abs=1e-6)
    assert out[2].item() == -4.0 and means[0].item() == 0.0  # unlisted class and the input untouched
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(30, 4, generator=gen)
    m = torch.randn(3, 4, generator=gen)
    assert torch.equal(compensate_drift(m, [], b, b + 1), m)  # no class listed: nothing moves
    torch.testing.assert_close(compensate_drift(m, [0, 1, 2], b, b), m)  # no drift: nothing moves
    uniform = compensate_drift(torch.zeros(2, 4), [0, 1], b, b + torch.tensor([1.0, -2, 0, 3]))
    torch.testing.assert_close(uniform, torch.tensor([[1.0, -2, 0, 3]] * 2))  # a uniform drift moves every mean by it
    with pytest.raises(ValueError, match="before"):
        compensate_drift(means, [0], before, after[:1])


@pytest.mark.slow  # two runs; test_head_alignment_in_the_loop_keeps_old_rows keeps the loop in the default tier
def test_prototype_alignment_keeps_class_stats_and_refits_every_seen_row(model_dir, tmp_path):
    results, rows = _run_with_head_rows(
        model_dir, tmp_path / "pr", merge_method="average", head_align="prototypes", head_align_drift="none"
    )
    assert not torch.equal(rows[0][[0, 1]], rows[1][[0, 1]])  # old classes' rows are refitted too
    assert torch.equal(rows[0][4:], rows[1][4:])  # unseen classes' rows untouched
    state = _checkpoint(tmp_path / "pr")
    counts = state["callbacks/head_align/count"]
    assert counts[:4].tolist() == [16.0] * 4 and counts[4:].sum() == 0  # 16 training samples per class, seen once
    assert state["callbacks/head_align/mean"].shape[0] == rows[0].shape[0]
    assert results["timings"][1]["head_align"] > 0
    # only the head moves: the merged backbone is exactly the one of the same run without alignment
    plain = _run(model_dir, tmp_path / "plain", merge_method="average")
    base = _checkpoint(tmp_path / "plain")
    backbone = [k for k in base if k.startswith("weights/") and "classifier" not in k]
    assert backbone and all(torch.equal(state[k], base[k]) for k in backbone)
    assert any(not torch.equal(state[k], base[k]) for k in base if "classifier" in k)
    assert plain["alphas"] == results["alphas"]
    # drift compensation moves only the old classes' stored means (the new ones are measured, not moved)
    _run(model_dir, tmp_path / "sdc", merge_method="average", head_align="prototypes", head_align_drift="sdc")
    sdc = _checkpoint(tmp_path / "sdc")
    mean, mean_sdc = state["callbacks/head_align/mean"], sdc["callbacks/head_align/mean"]
    assert not torch.allclose(mean[[0, 1]], mean_sdc[[0, 1]]) and torch.equal(mean[2:], mean_sdc[2:])


def test_domain_incremental_rejects_pretrained_start_rules(model_dir, tmp_path):
    with pytest.raises(ValueError, match="domain_incremental"):
        _run(model_dir, tmp_path / "dil", merge_method="task-arithmetic", scenario="domain_incremental")
    assert not (tmp_path / "dil").exists()


def test_joint_stream_keeps_lazy_image_transforms():
    import datasets

    from pm_hf.data.streams import Task, TaskStream
    from pm_hf.method.strategies.alpha import joint_stream

    def part(label):
        ds = datasets.Dataset.from_dict({"raw": [[float(label)] * 4], "labels": [label]})
        ds.set_transform(lambda b: {"pixel_values": [torch.tensor(r) * 2 for r in b["raw"]], "labels": b["labels"]})
        return ds

    stream = TaskStream([Task(f"t{c}", [c], part(c), part(c)) for c in (0, 1)], 2, ["a", "b"], "image", None)
    joint = joint_stream(stream)
    assert len(joint.tasks) == 1 and joint.tasks[0].classes == [0, 1]
    row = joint.tasks[0].train[1]
    assert torch.equal(row["pixel_values"], torch.full((4,), 2.0)) and row["labels"] == 1


def test_a_checkpoint_of_an_earlier_format_is_refused_with_a_clear_message(model_dir, tmp_path):
    import json

    out = tmp_path / "old"
    run_continual(*groups(model_dir, out, class_groups=[[0, 1], [2, 3]]), stop_after=1)
    meta_path = out / json.loads((out / "latest.json").read_text())["checkpoint"] / "state.json"
    meta = json.loads(meta_path.read_text())
    del meta["format"]  # as wave-1 checkpoints were written
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="checkpoint format 1"):
        run_continual(*groups(model_dir, out, class_groups=[[0, 1], [2, 3]]), resume=True)


def test_a_checkpoint_of_format_2_with_its_log_in_state_json_resumes_as_the_same_run(model_dir, tmp_path):
    import gzip
    import json

    from pm_hf.fileio import file_digest

    classes = [[0, 1], [2, 3]]
    whole = run_continual(*groups(model_dir, tmp_path / "whole", class_groups=classes))
    out = tmp_path / "old"
    run_continual(*groups(model_dir, out, class_groups=classes), stop_after=1)
    folder = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    meta = json.loads((folder / "state.json").read_text())
    meta.update(format=2, log=json.loads(gzip.decompress((folder / "log.json.gz").read_bytes())))
    (folder / "log.json.gz").unlink()  # as format 2 wrote it: the log inside state.json, no log file
    (folder / "state.json").write_text(json.dumps(meta))
    digests = {name: file_digest([folder / name]) for name in ("state.safetensors", "state.json")}
    (folder / "manifest.json").write_text(json.dumps({"sha256": digests}))
    resumed = run_continual(*groups(model_dir, out, class_groups=classes), resume=True)
    assert resumed["alphas"] == whole["alphas"] and resumed["accuracy_matrix"] == whole["accuracy_matrix"]


def test_results_from_the_task_log_by_hand():
    from pm_hf.run.results import results_dict

    log = [
        {"task": "a", "scores": {"accuracy": [0.9], "til_accuracy": [0.9]}, "alpha": 1.0, "alpha_raw": 1.0},
        {"task": "b", "scores": {"accuracy": [0.6, 0.7], "til_accuracy": [0.9, 0.8]}, "alpha": 0.5, "alpha_raw": 0.4},
    ]
    out = results_dict(log, [10, 30, 99], "accuracy", {}, "x")
    assert out["accuracy_matrix"] == [[0.9, None], [0.6, 0.7]] and out["til_accuracy_matrix"][1] == [0.9, 0.8]
    assert out["acc"] == pytest.approx((0.6 * 10 + 0.7 * 30) / 40) and out["eval_sizes"] == [10, 30]
    assert out["bwt"] == pytest.approx(0.6 - 0.9) and out["forgetting"] == pytest.approx(0.3)
    assert out["alphas"] == [1.0, 0.5] and out["alphas_raw"] == [1.0, 0.4] and out["oracle_scores"] == [None, None]
