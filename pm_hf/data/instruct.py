"""Continual instruction tuning of causal LMs: task streams of prompt/response pairs, collators, generation, scores.

Conventions (relied on by the continual loop):
- one task per dataset: `task_datasets` (a list of {dataset_name, data_files, dataset_config_name}, as for
  classification: Hub ids or local json/jsonl/csv/parquet files), or the top-level `dataset_name`/`data_files` as a
  single task. Text comes from `prompt_column` and `response_column`. `TaskStream.modality` is "instruction",
  `num_classes` = 0, `label_names` = [] and `Task.classes` = [];
- formatting: with a chat template (`use_chat_template` true, or null and `tokenizer.chat_template` set) the prompt
  part is the rendered user turn with `add_generation_prompt=True`, and the response part is what the rendered
  user + assistant conversation adds after it (for ChatML: "response<|im_end|>\\n"); an end-of-sequence id is
  appended when that part holds none. Without a template: bos (if the tokenizer has one) + "prompt\\n" and
  "response" + eos. Both parts are tokenized separately with `add_special_tokens=False`, so the prompt ids of
  training are exactly the ids generation starts from;
- the end-of-sequence id is `tokenizer.eos_token_id`, else `sep_token_id` (BERT-style tokenizers); the padding id
  is `tokenizer.pad_token_id`, else that end-of-sequence id. The tokenizer is never modified: the ids are passed
  to the collators and to `generate` explicitly (`resolve_pad_token_id`);
- labels are the input ids with -100 on every prompt position (padding gets -100 in the collator): the loss is the
  token CE on the response tokens (+ eos), after the usual one-token shift inside the model;
- truncation to the task's max length L (`max_length_per_task[t]`, else `max_length`): the prompt is kept whole
  and the response is cut at its end (the eos is then lost); a prompt of L tokens or more keeps its last L - 1
  tokens (the end of the question and the assistant header) and one response token (logged);
- caps (`max_train_samples`, `max_eval_samples`, per task) pick a seeded subset
  (`np.random.default_rng([seed, task, split])`, split 0 = train, 1 = eval) in dataset order; nothing is shuffled;
- columns (plain python lists, no torch format): train = input_ids, attention_mask, labels; eval = the same plus
  `prompt_input_ids` (the prompt ids, where generation starts), `prompt_text` (the raw prompt) and `reference`
  (the raw, untruncated response). The collators read only the keys they need, and the Trainer's
  `remove_unused_columns` drops the extra ones, so `Trainer.evaluate`/`predict` and the Fisher pass work on either
  split; `generate_responses` and `score_generations` use the extra ones.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from ..config.checks import invalid
from ..config.groups import DataArguments
from .sources import check_columns, describe_source, load_dataset_dict, short_name, source_specs
from .streams import Task, TaskStream

logger = logging.getLogger(__name__)

MODALITY = "instruction"
PROMPT_IDS_COLUMN = "prompt_input_ids"
PROMPT_TEXT_COLUMN = "prompt_text"
REFERENCE_COLUMN = "reference"
TRAIN_COLUMNS = ("input_ids", "attention_mask", "labels")
EVAL_COLUMNS = (*TRAIN_COLUMNS, PROMPT_IDS_COLUMN, PROMPT_TEXT_COLUMN, REFERENCE_COLUMN)


# ----------------------------------------------------------------------------------------------- special ids


def resolve_eos_token_id(tokenizer) -> int:
    """`eos_token_id`, else `sep_token_id`; raises if the tokenizer has neither."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise invalid(
        "model_name_or_path", getattr(tokenizer, "name_or_path", None), "its tokenizer has no eos or sep token."
    )


def resolve_pad_token_id(tokenizer) -> int:
    """`pad_token_id`, else the end-of-sequence id (`resolve_eos_token_id`). The tokenizer is not modified."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else resolve_eos_token_id(tokenizer)


# ---------------------------------------------------------------------------------------------- formatting


def uses_chat_template(tokenizer, use_chat_template: bool | None = None) -> bool:
    """Whether pairs are rendered with the chat template: `use_chat_template`, or (None) whether there is one."""
    has = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template and not has:
        fix = "the tokenizer has no chat template: use false (plain 'prompt\\nresponse<eos>') or null (auto)."
        raise invalid("use_chat_template", use_chat_template, fix)
    return has if use_chat_template is None else bool(use_chat_template)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_prompts(tokenizer, prompts: Sequence[str], use_chat_template: bool | None = None) -> list[list[int]]:
    """Token ids generation starts from for raw `prompts` (the same prompt part as in training)."""
    if uses_chat_template(tokenizer, use_chat_template):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        return _encode(tokenizer, texts)
    bos = getattr(tokenizer, "bos_token_id", None)
    return [([int(bos)] if bos is not None else []) + ids for ids in _encode(tokenizer, [f"{p}\n" for p in prompts])]


def encode_pairs(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], use_chat_template: bool | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) per pair, untruncated; every response ends with the end-of-sequence id."""
    eos = resolve_eos_token_id(tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, use_chat_template)
    if uses_chat_template(tokenizer, use_chat_template):
        tails = []
        for p, r in zip(prompts, responses):
            user = [{"role": "user", "content": p}]
            head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": r}], tokenize=False)
            if not full.startswith(head):
                fix = "the chat template's generation prompt is not a prefix of the rendered conversation, so the "
                raise invalid("use_chat_template", use_chat_template, fix + "response cannot be located: use false.")
            tails.append(full[len(head) :])
        response_ids = _encode(tokenizer, tails)
        response_ids = [ids if eos in ids else [*ids, eos] for ids in response_ids]
    else:
        response_ids = [[*ids, eos] for ids in _encode(tokenizer, list(responses))]
    return prompt_ids, response_ids


def truncate_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into `max_length` (>= 2): keep the prompt, cut the response end; a prompt that leaves
    no room keeps its last `max_length - 1` tokens and one response token."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    if len(prompt) < max_length:
        return prompt, response[: max_length - len(prompt)]
    return prompt[len(prompt) - (max_length - 1) :], response[:1]


# ------------------------------------------------------------------------------------------------- the stream


def _texts(ds: datasets.Dataset, column: str, arg: str, split: str, where: str) -> list[str]:
    values = ds[column]
    values = list(values) if not isinstance(values, list) else values
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise invalid(arg, column, f"row {i} of the '{split}' split of {where} holds {v!r}, not a string.")
    return values


def _subset(n: int, cap: int | None, key: list[int]) -> list[int]:
    if cap is None or n <= cap:
        return list(range(n))
    return np.sort(np.random.default_rng(key).choice(n, size=cap, replace=False)).tolist()


def _tokenize_split(
    ds: datasets.Dataset,
    tokenizer,
    data_args: DataArguments,
    max_length: int,
    keep_generation_columns: bool,
    where: str,
    split: str,
    desc: str,
) -> datasets.Dataset:
    prompts = _texts(ds, data_args.prompt_column, "prompt_column", split, where)
    responses = _texts(ds, data_args.response_column, "response_column", split, where)
    prompt_ids, response_ids = encode_pairs(tokenizer, prompts, responses, data_args.use_chat_template)
    rows: dict[str, list] = {c: [] for c in (EVAL_COLUMNS if keep_generation_columns else TRAIN_COLUMNS)}
    cut_prompts = cut_responses = 0
    for p_text, r_text, p, r in zip(prompts, responses, prompt_ids, response_ids):
        p2, r2 = truncate_pair(p, r, max_length)
        cut_prompts += len(p2) < len(p)
        cut_responses += len(r2) < len(r)
        rows["input_ids"].append(p2 + r2)
        rows["attention_mask"].append([1] * (len(p2) + len(r2)))
        rows["labels"].append([-100] * len(p2) + r2)
        if keep_generation_columns:
            rows[PROMPT_IDS_COLUMN].append(p2)
            rows[PROMPT_TEXT_COLUMN].append(p_text)
            rows[REFERENCE_COLUMN].append(r_text)
    if cut_responses:
        logger.info("%s: %d of %d responses cut to max_length=%d.", desc, cut_responses, len(prompts), max_length)
    if cut_prompts:
        logger.warning(
            "%s: %d of %d prompts are longer than max_length=%d - 1 and keep only their last tokens; raise "
            "`max_length` (or `max_length_per_task`).",
            desc,
            cut_prompts,
            len(prompts),
            max_length,
        )
    features = {
        "input_ids": datasets.List(datasets.Value("int64")),
        "attention_mask": datasets.List(datasets.Value("int64")),
        "labels": datasets.List(datasets.Value("int64")),
    }
    if keep_generation_columns:
        features[PROMPT_IDS_COLUMN] = datasets.List(datasets.Value("int64"))
        features[PROMPT_TEXT_COLUMN] = datasets.Value("string")
        features[REFERENCE_COLUMN] = datasets.Value("string")
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def _task_lengths(data_args: DataArguments, num_tasks: int) -> list[int]:
    lengths = data_args.max_length_per_task
    if lengths is None:
        return [data_args.max_length] * num_tasks
    if len(lengths) != num_tasks:
        raise invalid("max_length_per_task", lengths, f"give one length per task ({num_tasks}), or null.")
    return list(lengths)


def _task_split(loaded, spec: dict | str, t: int, code: int, tokenizer, data_args, max_length: int, seed: int):
    """Task t's training (code 0) or eval (code 1) split: checked, capped and tokenized. `loaded` maps split names
    to datasets; `spec` is the source's spec (or a description of in-memory splits)."""
    where = spec if isinstance(spec, str) else describe_source(spec)
    arg, cap = (("train_split", data_args.max_train_samples), ("eval_split", data_args.max_eval_samples))[code]
    split = getattr(data_args, arg)
    if split not in loaded:
        raise invalid(arg, split, f"not a split of {where}; use one of {list(loaded)}.")
    ds = loaded[split]
    if not isinstance(ds, datasets.Dataset):
        raise invalid(arg, split, f"the '{split}' split of {where} is not a map-style Dataset (streaming is not "
                      "supported for instruction tasks).")  # fmt: skip
    columns = {"prompt_column": data_args.prompt_column, "response_column": data_args.response_column}
    check_columns(ds, columns, split, where)
    if len(ds) == 0:
        raise invalid(arg, split, f"the '{split}' split of {where} is empty.")
    ds = ds.select(_subset(len(ds), cap, [seed, t, code]))
    desc = f"task {t} ({'train' if code == 0 else 'eval'})"
    return _tokenize_split(ds, tokenizer, data_args, max_length, code == 1, where, split, desc)


def build_instruction_stream(
    data_args: DataArguments, tokenizer, seed: int = 0, main_process_first: Callable | None = None
) -> TaskStream:
    """Load one prompt/response dataset per task, tokenize it for causal-LM training and generation evaluation.

    Args:
        data_args: `task_datasets` (or the top-level dataset as one task), `train_split`/`eval_split`,
            `prompt_column`/`response_column`, `max_length`/`max_length_per_task`, `max_train_samples`/
            `max_eval_samples` (per task) and `use_chat_template`.
        tokenizer: a (fast or slow) HF tokenizer; not modified.
        seed: seeds the per-task caps.
        main_process_first: e.g. `training_args.main_process_first`; loading runs inside it.

    Returns:
        `TaskStream(tasks, num_classes=0, label_names=[], modality="instruction", collate_fn=CausalLMCollator)`;
        column layout in the module docstring.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise invalid("seed", seed, "use a non-negative integer.")
    if tokenizer is None or not callable(tokenizer):
        raise ValueError("Instruction data needs a tokenizer (got None).")
    resolve_eos_token_id(tokenizer)  # fail early
    uses_chat_template(tokenizer, data_args.use_chat_template)
    specs = source_specs(data_args)
    lengths = _task_lengths(data_args, len(specs))
    first = main_process_first or contextlib.nullcontext
    tasks = []
    for t, spec in enumerate(specs):
        with first():
            loaded = load_dataset_dict(spec)
        splits = [
            _task_split(loaded, spec, t, code, tokenizer, data_args, lengths[t], seed)
            for code in (0, 1)  # 0: train, 1: eval
        ]
        tasks.append(Task(f"task_{t}: {short_name(spec, data_args.train_split)}", [], splits[0], splits[1]))
    return TaskStream(tasks, 0, [], MODALITY, CausalLMCollator(resolve_pad_token_id(tokenizer)))


# ------------------------------------------------------------------------------------------------- collators


def token_ids(value) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


@dataclass
class CausalLMCollator:
    """Right-pads `input_ids` (with `pad_token_id`), `attention_mask` (0) and `labels` (-100) to the longest row.

    Reads only those keys (other columns, e.g. `reference`, are ignored); `attention_mask` defaults to ones and
    `labels` is emitted only when the rows have it. Rows may hold lists or 1-D tensors. Returns int64 tensors.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        ids = [token_ids(f["input_ids"]) for f in features]
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        masks = [
            token_ids(f["attention_mask"]) if "attention_mask" in f else [1] * len(x) for f, x in zip(features, ids)
        ]
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long),
        }
        if all("labels" in f for f in features):
            labels = [token_ids(f["labels"]) for f in features]
            batch["labels"] = torch.tensor([y + [-100] * (width - len(y)) for y in labels], dtype=torch.long)
        return batch


@dataclass
class PromptCollator:
    """Left-pads prompts for generation: `input_ids` from `key` (default `prompt_input_ids`, falling back to
    `input_ids`), `attention_mask` 0 on the padding. Other keys are ignored."""

    pad_token_id: int
    key: str = PROMPT_IDS_COLUMN

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        ids = [token_ids(f[self.key] if self.key in f else f["input_ids"]) for f in features]
        width = max(len(x) for x in ids)
        return {
            "input_ids": torch.tensor([[self.pad_token_id] * (width - len(x)) + x for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], dtype=torch.long),
        }


def causal_lm_collator(tokenizer, pad_to_multiple_of: int | None = None) -> CausalLMCollator:
    return CausalLMCollator(resolve_pad_token_id(tokenizer), pad_to_multiple_of)


def instruction_task(t: int, entry: dict, tokenizer, data_args: DataArguments, seed: int = 0) -> Task:
    """Task t from in-memory splits of prompt/response pairs (`pm_hf.data.streams.task_splits`' form: `{"train":
    Dataset,
    "test": Dataset or None}`; None: trained and merged, never scored)."""
    where = f"tasks[{t}]"
    loaded = {data_args.train_split: entry["train"], data_args.eval_split: entry["test"]}
    max_length = data_args.max_length  # `max_length_per_task` is for `task_datasets`
    codes = (0, 1) if entry["test"] is not None else (0,)
    splits = [_task_split(loaded, where, t, code, tokenizer, data_args, max_length, seed) for code in codes]
    return Task(f"task_{t}: {entry.get('name', t)}", [], splits[0], splits[1] if len(splits) > 1 else None)
