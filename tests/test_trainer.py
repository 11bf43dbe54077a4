"""PMTrainer: the perturbation adds no pass, leaves weights alone, has the right gradient, and is deterministic."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import randomize_lora, tiny_bert
from datasets import Dataset
from transformers import Trainer, TrainerCallback

from pm_hf import LoraArguments, PMConfig, PMTrainer
from pm_hf.method.adapters import active_adapter, attach_lora, lora_layers
from pm_hf.method.perturb import expected_curvature_weight, sample_branch


def make_model(seed=0, random_lora=True):
    model = attach_lora(tiny_bert(num_labels=3, seed=seed), LoraArguments(r=4), trainable_modules=["classifier"])
    if random_lora:
        randomize_lora(model, seed=seed + 1, scale=0.2)
    return model


def make_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(3, 64, (n, 8), generator=g).tolist(),
            "labels": torch.randint(0, 3, (n,), generator=g).tolist(),
        }
    )


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=5e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=7,
        data_seed=7,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return PMConfig(**base)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_one_forward_one_backward_per_micro_batch(tmp_path):
    model = make_model()
    counts = Counter()
    model.register_forward_hook(lambda *a: counts.update(["forward"]))
    classifier = model.base_model.model.classifier
    classifier.register_full_backward_hook(lambda *a: counts.update(["backward"]))
    args = make_args(
        tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, perturb_probs=[0.5, 0, 0.5]
    )
    PMTrainer(model=model, args=args, train_dataset=make_data(16)).train()
    assert counts["forward"] == 8 and counts["backward"] == 8  # 16 samples / batch 2 = 8 micro-batches


@pytest.mark.parametrize("kw", [dict(perturbation="none"), dict(perturb_eps=0.0)])
def test_no_perturbation_is_plain_trainer_bit_for_bit(tmp_path, kw):
    runs = []
    for cls, extra in ((Trainer, {}), (PMTrainer, kw)):
        model, log = make_model(), LossLog()
        args = make_args(tmp_path, num_train_epochs=2, **extra)
        cls(model=model, args=args, train_dataset=make_data(), callbacks=[log]).train()
        runs.append((log.losses, trainable_state(model)))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 8
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


class CheckingTrainer(PMTrainer):
    """Records weights and scalings around every training_step."""

    violations: list

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = trainable_state(self.model)
        scalings = [dict(layer.scaling) for layer in lora_layers(self.model).values()]
        out = super().training_step(model, inputs, num_items_in_batch)
        after = trainable_state(self.model)
        self.violations += [n for n in before if not torch.equal(before[n], after[n])]
        self.violations += ["scaling"] * (
            scalings != [dict(layer.scaling) for layer in lora_layers(self.model).values()]
        )
        return out


def test_weights_and_scaling_untouched_by_training_step(tmp_path):
    model = make_model()
    trainer = CheckingTrainer(
        model=model, args=make_args(tmp_path, perturb_probs=[0.5, 0.0, 0.5]), train_dataset=make_data()
    )
    trainer.violations = []
    start = trainable_state(model)
    trainer.train()
    assert trainer.violations == []
    assert trainer.branch_counts[0] == 0 and sum(trainer.branch_counts.values()) == 4
    assert any(not torch.equal(start[n], p) for n, p in trainable_state(model).items())  # training did happen


@pytest.mark.parametrize("branch,probs", [(-1, [1.0, 0.0, 0.0]), (1, [0.0, 0.0, 1.0])])
def test_gradient_equals_hand_scaled_loss(tmp_path, branch, probs):
    eps = 0.5
    model = make_model()
    trainer = PMTrainer(
        model=model, args=make_args(tmp_path, perturb_eps=eps, perturb_probs=probs), train_dataset=make_data()
    )
    batch = {"input_ids": torch.tensor(make_data(4)["input_ids"]), "labels": torch.tensor(make_data(4)["labels"])}
    assert trainer.current_branch() == branch
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; training_step is called directly here
    model.zero_grad()
    trainer.training_step(model, dict(batch))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_model = copy.deepcopy(model)
    ref_model.zero_grad()
    name = active_adapter(ref_model)
    for layer in lora_layers(ref_model).values():
        layer.scaling[name] *= 1 + branch * eps
    ref_model.train()
    ref_model(**batch).loss.backward()
    for n, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # and it differs from the unperturbed gradient (the test can fail)
    plain = copy.deepcopy(model)
    plain.zero_grad()
    plain(**batch).loss.backward()
    lora_names = [n for n in got if "lora_A" in n]
    assert any(not torch.allclose(got[n], dict(plain.named_parameters())[n].grad) for n in lora_names)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    finals = []
    for bs, ga in ((8, 1), (4, 2)):
        model = make_model()
        args = make_args(
            tmp_path,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            num_train_epochs=3,
            perturb_probs=[0.4, 0.2, 0.4],
        )
        trainer = PMTrainer(model=model, args=args, train_dataset=make_data(16))
        trainer.train()
        finals.append((trainable_state(model), dict(trainer.branch_counts)))
    assert finals[0][1] == finals[1][1]
    for name, value in finals[0][0].items():
        torch.testing.assert_close(value, finals[1][0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_branch_frequencies_and_determinism():
    probs = [0.2, 0.3, 0.5]
    draws = np.array([sample_branch(3, 1, step, probs) for step in range(20000)])
    freq = [(draws == b).mean() for b in (-1, 0, 1)]
    np.testing.assert_allclose(freq, probs, atol=0.015)  # ~4 standard errors
    torch.manual_seed(0)
    np.random.seed(0)
    again = [sample_branch(3, 1, step, probs) for step in range(200)]
    assert again == draws[:200].tolist()  # independent of global RNG state (same on every rank)
    assert [sample_branch(3, 2, s, probs) for s in range(200)] != again  # the task index matters
    assert expected_curvature_weight(0.5, [1 / 3, 1 / 3, 1 / 3]) == pytest.approx(1 / 12)


def test_gaussian_ablation_trains_and_restores(tmp_path):
    model = make_model()
    trainer = CheckingTrainer(
        model=model,
        args=make_args(tmp_path, perturbation="gaussian", perturb_probs=[0.5, 0, 0.5]),
        train_dataset=make_data(),
    )
    trainer.violations = []
    trainer.train()
    assert trainer.violations == []
    assert all(not layer._forward_hooks for layer in lora_layers(model).values())


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(perturbation="isotropic"), "perturbation"),
        (dict(perturb_eps=-0.1), "perturb_eps"),
        (dict(perturb_eps=1.5), "perturb_eps"),
        (dict(perturb_probs=[0.5, 0.5]), "perturb_probs"),
        (dict(perturb_probs=[0.5, 0.5, 0.5]), "perturb_probs"),
    ],
)
def test_config_errors_name_the_field(tmp_path, kw, field):
    with pytest.raises(ValueError, match=field):
        make_args(tmp_path, **kw)


@pytest.mark.parametrize("head_lr", [None, 0.5])
def test_head_learning_rate_moves_only_the_head(tmp_path, head_lr):
    """learning_rate 0 with head_learning_rate 0.5: the head trains, LoRA stays put; without a head lr a learning
    rate of 0 trains nothing and is refused."""
    if head_lr is None:
        with pytest.raises(ValueError, match="^learning_rate = 0.0: use a finite number > 0"):
            make_args(tmp_path, learning_rate=0.0)
        return
    model = make_model()
    before = trainable_state(model)
    args = make_args(tmp_path, learning_rate=0.0, head_learning_rate=head_lr, perturbation="none", weight_decay=0.0)
    trainer = PMTrainer(model=model, args=args, train_dataset=make_data(), head_modules=["classifier"])
    trainer.train()
    after = trainable_state(model)
    head = [n for n in before if ".classifier." in n]
    assert head and len(head) < len(before)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == (head_lr is not None and name in head), name
    groups = trainer.optimizer.param_groups
    assert sum(len(g["params"]) for g in groups) == len(before)


def test_late_branch_losses_come_back_per_process_or_with_their_sums_kept():
    from types import SimpleNamespace

    from pm_hf.method.trainer import own_late_losses

    saved = [{"-1": [1.0, 2.0], "0": [], "1": [5.0]}, {"-1": [3.0], "0": [4.0], "1": []}]  # as the JSON holds them
    two = [own_late_losses(saved, SimpleNamespace(world_size=2, process_index=r)) for r in (0, 1)]
    assert two == [{-1: [1.0, 2.0], 0: [], 1: [5.0]}, {-1: [3.0], 0: [4.0], 1: []}]  # each process its own
    one = own_late_losses(saved, SimpleNamespace(world_size=1, process_index=0))
    assert one == {-1: [1.0, 2.0, 3.0], 0: [4.0], 1: [5.0]}  # another number of processes: every loss, once
    three = [own_late_losses(saved, SimpleNamespace(world_size=3, process_index=r)) for r in (0, 1, 2)]
    assert three[0] == one and three[1] == three[2] == {-1: [], 0: [], 1: []}
    assert own_late_losses({"-1": [7.0]}, SimpleNamespace(world_size=1, process_index=0)) == {-1: [7.0], 0: [], 1: []}


def test_bad_trainer_arguments_are_input_errors_before_output_dir_is_made(tmp_path):
    """As the building blocks' other doors: `args` without the perturbation fields, a task index that is no 0-based
    index (a TypeError / ValueError after the Trainer had made output_dir, before), a model without LoRA."""
    from transformers import TrainingArguments

    from pm_hf.config.training_args import PMConfig
    from pm_hf.errors import InputError

    out = tmp_path / "out"
    plain = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True)
    with pytest.raises(InputError, match=r"^args = 'TrainingArguments': PMTrainer needs the perturbation fields"):
        PMTrainer(model=make_model(), args=plain)  # (it was a TypeError)
    config = PMConfig(output_dir=str(out), report_to=[], use_cpu=True)
    for index in (-1, "0", True):
        with pytest.raises(InputError, match=r"^task_index = .*: use the 0-based index"):
            PMTrainer(model=make_model(), args=config, task_index=index)
    assert not out.exists()
    with pytest.raises(InputError, match=r"^model = 'BertForSequenceClassification': has no LoRA layers"):
        PMTrainer(model=tiny_bert(num_labels=2), args=config)
