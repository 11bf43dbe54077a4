"""The rivals a user of the HF stack would try first (issue 24), through the real loop (tiny BERT): `osf`, PEFT's OSF
tuner continued across tasks, and `olora`, a new LoRA per task with O-LoRA's orthogonality loss to the earlier tasks'
A. Each rule's defining property is checked on the saved state or by hand."""

import pytest
import torch
from conftest import checkpoint_tensors, groups
from transformers import AutoModelForSequenceClassification, TrainerCallback

from pm_hf.continual import run_continual
from pm_hf.method.adapters import base_weights, lora_weights
from pm_hf.method.adapters_osf import osf_layers, preserved_rank, unwrap_osf, wrap_osf
from pm_hf.method.callbacks import ContinualCallback
from pm_hf.method.strategies.olora import l2_penalty, orthogonality_penalty

_checkpoint = checkpoint_tensors


def _pretrained(model_dir, num_labels=10):
    return AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, ignore_mismatched_sizes=True
    )


class _BaseWeights(ContinualCallback):
    """The adapted layers' base weights when each task begins and after each merge."""

    def __init__(self):
        self.begin, self.merged = [], []

    def on_task_begin(self, t, model, task):
        self.begin.append({k: w.detach().clone() for k, w in base_weights(model).items()})

    def on_merge(self, t, model, task):
        self.merged.append({k: w.detach().clone() for k, w in base_weights(model).items()})


def _train_osf(model, inputs, fraction: float, steps: int = 5) -> dict:
    """One task as `osf` trains it: PEFT's OSF layers at `fraction` preserved, AdamW, then the delta merged."""
    wrap_osf(model, fraction)
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(".osf_svd_params." in n for n, p in model.named_parameters() if p.requires_grad)
    assert not any(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)  # LoRA frozen meanwhile
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).loss.backward()
        optimizer.step()
    deltas = unwrap_osf(model)
    with torch.no_grad():
        for key, w in base_weights(model).items():
            w += deltas[key]
    return deltas


def test_osf_layers_keep_the_preserved_subspace_of_the_first_task(model_dir):
    """PEFT's OSF layers as `osf` wraps them, two tasks: task 2's update has ~no part in the top singular directions
    of the weights task 1 left (both sides: U_high^T dW V_high^T; AdamW's per-entry steps leave a second-order
    remainder), its mass is in the trainable rest; afterwards the bare layers and trainable LoRA are back."""
    from transformers import AutoTokenizer

    from pm_hf import LoraArguments
    from pm_hf.method.adapters import attach_lora

    torch.manual_seed(0)
    model = attach_lora(_pretrained(model_dir, 2), LoraArguments(r=2), trainable_modules=["classifier"])
    model.eval()  # no dropout
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = {**tok(["a dog barks", "a red cat", "the stone", "music"], return_tensors="pt", padding=True),
              "labels": torch.tensor([0, 1, 0, 1])}  # fmt: skip
    _train_osf(model, inputs, 0.0)  # task 1 of 2: everything but the top direction trains
    w1 = {k: w.detach().clone() for k, w in base_weights(model).items()}
    deltas = _train_osf(model, inputs, 0.5)  # task 2 of 2: half of the rank preserved
    assert not osf_layers(model) and all(p.requires_grad for p in lora_weights(model, "A").values())
    for key, delta in deltas.items():
        U, _, Vh = torch.linalg.svd(w1[key])
        k = preserved_rank(0.5, min(delta.shape))
        preserved = (U[:, :k].T @ delta @ Vh[:k].T).norm() / delta.norm()
        trainable = (U[:, k:].T @ delta @ Vh[k:].T).norm() / delta.norm()
        assert float(delta.norm()) > 1e-3 and preserved < 1e-2 and trainable > 0.9, (key, preserved, trainable)


@pytest.mark.slow
def test_osf_keeps_the_preserved_subspace_of_the_first_task(model_dir, tmp_path):
    """`osf` (PEFT's OSF layers, SVD re-taken per task): the update of task 2 has ~no part in the top singular
    directions of the weights task 1 left (both sides: U_high^T dW V_high^T), its mass is in the trainable rest,
    and the deployed model is the one trained (accuracy after the merge = before it)."""
    record = _BaseWeights()
    results = run_continual(*groups(model_dir, tmp_path / "osf", merge_method="osf", class_groups=[[0, 1], [2, 3]],
                                    perturbation="none", save_strategy="no"), callbacks=[record])  # fmt: skip
    for t in range(2):
        assert results["accuracy_matrix"][t][t] == pytest.approx(results["pre_merge_acc"][t], abs=1e-12)
    state = _checkpoint(tmp_path / "osf")
    assert not [k for k in state if "osf" in k]  # OSF's layers are gone from the saved model
    for key, w1 in record.begin[1].items():
        delta = record.merged[1][key] - w1
        U, _, Vh = torch.linalg.svd(w1)
        k = preserved_rank(0.5, min(w1.shape))  # task 2 of 2 preserves half of the rank
        assert 1 <= k < min(w1.shape)
        preserved = (U[:, :k].T @ delta @ Vh[:k].T).norm() / delta.norm()
        trainable = (U[:, k:].T @ delta @ Vh[k:].T).norm() / delta.norm()
        assert float(delta.norm()) > 1e-3, key  # task 2 did change the weight
        assert preserved < 1e-2 and trainable > 0.9, (key, float(preserved), float(trainable))
        assert torch.equal(state[f"weights/{key}"], record.merged[1][key])


def test_osf_refuses_mid_task_checkpoints_and_perturbation_before_writing(model_dir, tmp_path):
    from pm_hf.errors import InputError

    with pytest.raises(InputError, match="save_strategy = 'steps'"):
        run_continual(*groups(model_dir, tmp_path / "o", merge_method="osf", save_strategy="steps"))
    with pytest.raises(InputError, match="perturbation = 'task_vector'"):  # a no-op on OSF: refused, not ignored
        run_continual(*groups(model_dir, tmp_path / "o", merge_method="osf", save_strategy="no",
                              perturbation="task_vector"))  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_olora_penalty_by_hand():
    old = {"a": torch.tensor([[1.0, 0.0, 2.0]]), "b": torch.ones(1, 2)}  # "b" has no new A: it adds nothing
    new = {"a": torch.tensor([[1.0, 1.0, 1.0], [0.0, -3.0, 1.0]]), "c": torch.ones(2, 2)}  # "c" has no old A
    # |<old_a, new_0>| + |<old_a, new_1>| = |1 + 0 + 2| + |0 + 0 + 2| = 5
    assert float(orthogonality_penalty(new, old)) == pytest.approx(5.0)
    assert float(orthogonality_penalty(new, {})) == 0.0
    assert float(l2_penalty({"x": torch.tensor([[3.0, 4.0]]), "y": torch.tensor([[0.0, 2.0]])})) == pytest.approx(7.0)


def test_olora_gradient_lies_in_the_old_span_and_pushes_away_from_it():
    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(2, 6, generator=gen), torch.randn(3, 6, generator=gen).requires_grad_(True)
    orthogonality_penalty({"k": new}, {"k": old}).backward()
    span = old.T @ torch.linalg.inv(old @ old.T) @ old  # projector onto the rows' span of the old A
    grad = new.grad
    assert torch.allclose(grad, torch.sign(new @ old.T).detach() @ old)  # d/dA sum |A old^T| by hand
    assert torch.allclose(grad @ span, grad, atol=1e-5)  # it moves A only within the old span ...
    stepped = new.detach() - 0.01 * grad
    assert (stepped @ span).norm() < (new.detach() @ span).norm()  # ... and out of it
    assert torch.allclose(stepped @ (torch.eye(6) - span), new.detach() @ (torch.eye(6) - span), atol=1e-6)


def test_a_loss_term_joins_the_training_loss_only(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from pm_hf import LoraArguments, PMConfig, PMTrainer
    from pm_hf.method.adapters import attach_lora
    from pm_hf.method.trainer import LossTerm

    class Half(LossTerm):
        calls = 0

        def __call__(self, model):
            Half.calls += 1
            return 0.5 * sum(a.sum() for a in lora_weights(model, "A").values())

    model = attach_lora(_pretrained(model_dir, 2), LoraArguments(r=2), trainable_modules=["classifier"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    inputs = {**tok(["a dog", "a cat"], return_tensors="pt", padding=True), "labels": torch.tensor([0, 1])}
    args = PMConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], perturbation="none")
    trainer = PMTrainer(model=model, args=args, callbacks=[Half()])
    model.eval()  # no dropout: the two losses see the same forward
    plain = trainer.compute_loss(model, inputs)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with_term = trainer.compute_loss(model, inputs)
    expected = 0.5 * sum(float(a.detach().sum()) for a in lora_weights(model, "A").values())
    assert float((with_term - plain).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6) and Half.calls == 1


class _TrainingA(TrainerCallback):
    """The LoRA A of every layer when each task's training begins and ends."""

    def __init__(self):
        self.start, self.end = [], []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start.append({k: a.detach().clone() for k, a in lora_weights(model, "A").items()})

    def on_train_end(self, args, state, control, model=None, **kw):
        self.end.append({k: a.detach().clone() for k, a in lora_weights(model, "A").items()})


@pytest.mark.slow
def test_olora_keeps_earlier_A_and_trains_the_new_one_away_from_them(model_dir, tmp_path):
    """`olora` through the loop: the strategy keeps task 1's trained A (checkpointed), and task 2's A ends more
    orthogonal to it than it started (a strong lambda_1, so the penalty dominates the tiny run's loss)."""
    record = _TrainingA()
    out = tmp_path / "olora"
    run_continual(*groups(model_dir, out, merge_method="olora", merge_parameters={"olora_lambda": 5.0},
                          class_groups=[[0, 1], [2, 3]], perturbation="none"), callbacks=[record])  # fmt: skip
    state = _checkpoint(out)
    for key, a0 in record.end[0].items():
        kept = state[f"strategy/A/{key}"]
        assert torch.equal(kept[: a0.shape[0]], a0) and kept.shape[0] == 2 * a0.shape[0]
    before = float(orthogonality_penalty(record.start[1], record.end[0]))
    after = float(orthogonality_penalty(record.end[1], record.end[0]))
    assert after < 0.5 * before, (before, after)
