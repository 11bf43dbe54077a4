"""P&M composed with TRL's SFTTrainer (`pm_hf.method.sft`): the perturbation runs inside TRL's own training step, and
with
the perturbation off the trainer is TRL's, bit for bit."""

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from pm_hf.config.groups import LoraArguments  # noqa: E402
from pm_hf.errors import InputError  # noqa: E402
from pm_hf.method.adapters import attach_lora, lora_layers  # noqa: E402
from pm_hf.method.sft import PMSFTConfig, PMSFTTrainer  # noqa: E402

WORDS = "red green blue small big tree house river stone bird".split()


def _setup(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok", [" ".join(WORDS)], max_words=50)
    tok.eos_token = tok.sep_token
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"prompt": " ".join(WORDS[i] for i in torch.randint(0, 10, (3,), generator=gen).tolist()),
         "completion": " " + WORDS[int(torch.randint(0, 10, (1,), generator=gen))]}
        for _ in range(16)
    ]  # fmt: skip
    model = tiny_llama(0)
    model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model = attach_lora(model, LoraArguments(r=2, target_modules=["q_proj", "v_proj"]))
    return tok, Dataset.from_list(rows), model


class Scalings(TrainerCallback):
    """The adapter's scaling seen at every step end (it must be back to its value before the optimizer step)."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.seen.append({float(m.scaling["default"]) for m in lora_layers(model).values()})


def _train(tmp_path, tok, data, model, **kw):
    args = PMSFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=2,
                       learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no", max_length=32,
                       completion_only_loss=True, seed=0, **kw)  # fmt: skip
    callback = Scalings()
    trainer = PMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.train()
    return trainer, callback


def test_the_perturbation_runs_inside_trls_training_step(tmp_path):
    tok, data, model = _setup(tmp_path)
    trainer, callback = _train(tmp_path, tok, data, model, perturbation="task_vector", perturb_eps=0.5)
    counts = trainer.branch_counts
    assert sum(counts.values()) == 8 and counts[-1] > 0 and counts[1] > 0  # 16 rows / 4 x 2 epochs
    assert len({frozenset(s) for s in callback.seen}) == 1, callback.seen  # restored before every optimizer step


def test_without_perturbation_it_is_trls_sft_trainer_bit_for_bit(tmp_path):
    tok, data, model = _setup(tmp_path)
    _, _ = _train(tmp_path / "a", tok, data, model, perturbation="none")
    ours = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _, _, plain_model = _setup(tmp_path / "b")
    args = trl.SFTConfig(output_dir=str(tmp_path / "plain"), per_device_train_batch_size=4, num_train_epochs=2,
                         learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no", max_length=32,
                         completion_only_loss=True, seed=0)  # fmt: skip
    trl.SFTTrainer(model=plain_model, args=args, train_dataset=data, processing_class=tok).train()
    plain = {n: p.detach() for n, p in plain_model.named_parameters() if p.requires_grad}
    assert ours.keys() == plain.keys() and all(torch.equal(ours[n], plain[n]) for n in ours)


def test_args_without_the_perturbation_fields_are_refused(tmp_path):
    tok, data, model = _setup(tmp_path)
    args = trl.SFTConfig(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True, max_length=32)
    with pytest.raises(InputError, match=r"^args = 'SFTConfig': PMSFTTrainer needs the perturbation fields"):
        PMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    assert not (tmp_path / "x").exists()  # refused before the Trainer made its output_dir


@pytest.mark.parametrize("branch, probs", [(-1, [1.0, 0.0, 0.0]), (1, [0.0, 0.0, 1.0])])
def test_loss_and_gradient_are_taken_at_the_perturbed_point(tmp_path, branch, probs):
    """One TRL training step of PMSFTTrainer equals a brute-force step at theta_0 + (1 + b eps) s B A: the loss of a
    copy whose weights have that delta written in (adapter off), the gradient of a copy whose adapter is scaled."""
    import copy

    eps = 0.5
    tok, data, model = _setup(tmp_path)
    args = PMSFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                       max_length=32, completion_only_loss=True, seed=0, perturb_eps=eps,
                       perturb_probs=probs)  # fmt: skip
    trainer = PMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer.current_branch() == branch and (batch["labels"] == -100).any()  # the prompt is masked out
    with torch.no_grad():  # a trained-looking adapter (B starts at 0: no perturbation to see)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    reference = _setup(tmp_path / "reference")[2]  # not a deepcopy of `model`: its copies would call its forward
    reference.load_state_dict(model.state_dict())
    scalings = [dict(layer.scaling) for layer in lora_layers(model).values()]
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; training_step is called directly here
    model.zero_grad()
    loss = float(trainer.training_step(model, dict(batch)))
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert scalings == [dict(layer.scaling) for layer in lora_layers(model).values()]  # restored after the step
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    written = copy.deepcopy(reference)  # the perturbed weights written into the base, the adapter off
    with torch.no_grad():
        for layer in lora_layers(written).values():
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
            layer.get_base_layer().weight += (1 + branch * eps) * delta
    written.train()
    with written.disable_adapter():
        assert loss == pytest.approx(float(written(**inputs).loss), rel=1e-5)

    scaled = copy.deepcopy(reference)
    for layer in lora_layers(scaled).values():
        layer.scaling["default"] *= 1 + branch * eps
    scaled.train()
    scaled.zero_grad()
    scaled(**inputs).loss.backward()
    lora = [n for n in got if "lora_" in n]
    assert lora and set(got) == {n for n, p in scaled.named_parameters() if p.requires_grad}
    for n, p in scaled.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    plain = copy.deepcopy(reference)  # and the unperturbed gradient differs (the test can fail)
    plain.train()
    plain(**inputs).loss.backward()
    grads = dict(plain.named_parameters())
    assert any(not torch.allclose(got[n], grads[n].grad, rtol=1e-3) for n in lora)
