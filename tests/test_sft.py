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
    with pytest.raises(TypeError, match="perturbation fields"):
        PMSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
