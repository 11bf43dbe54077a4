"""What a run trains on: `ModelArguments` (the pretrained model, its task and loading options) and `DataArguments`
(the task stream). Every check names the field, the bad value and the fix, in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import check_choice, check_data_files, check_field_types, check_number, invalid

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental")
MODEL_TASKS = ("auto", "sequence_classification", "image_classification", "causal_lm")
LM_METRICS = ("rougeL", "exact_match")


@dataclass
class ModelArguments:
    """Which pretrained model to fine-tune continually."""

    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Hub model id or local folder (e.g. 'google/vit-base-patch16-224', a saved model dir)."},
    )
    model_task: str = field(
        default="auto",
        metadata={
            "help": "'sequence_classification', 'image_classification', 'causal_lm' (instruction tuning: "
            "prompt/response tasks, scored by generation) or 'auto' (a *ForCausalLM checkpoint is 'causal_lm'; "
            "otherwise from the data columns)."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Model weights dtype: 'float32' or 'bfloat16' (merged weights then keep an fp32 master copy)."
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model; null: the default branch."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run code from the model's Hub repository (off by default: only if you trust it)."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel, e.g. 'eager', 'sdpa', 'flash_attention_2'; null: the model's."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: the base in 4-bit NF4 (bitsandbytes, CUDA); merges go to a merged adapter."},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "The base in 8-bit (bitsandbytes, CUDA); merges go to a merged adapter."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "causal_lm: greedy generation length for the scores."})
    primary_metric: str = field(
        default="rougeL",
        metadata={"help": "causal_lm: the score in `accuracy_matrix` and the summaries: 'rougeL' or 'exact_match'."},
    )

    def __post_init__(self):
        check_field_types(self)
        if not self.model_name_or_path:
            raise invalid("model_name_or_path", self.model_name_or_path, "give a Hub model id or a local model folder.")
        check_choice("model_task", self.model_task, MODEL_TASKS)
        check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("primary_metric", self.primary_metric, LM_METRICS)
        check_number("max_new_tokens", self.max_new_tokens, 1, integer=True)
        if self.load_in_4bit and self.load_in_8bit:
            raise invalid("load_in_8bit", True, "choose one of load_in_4bit and load_in_8bit.")


@dataclass
class DataArguments:
    """The task stream: one dataset split into class groups (class/task-incremental) or one dataset per task."""

    dataset_name: str = field(
        default="parquet",
        metadata={
            "help": "`datasets.load_dataset` path: a Hub id ('cifar100') or a builder ('parquet', 'csv', 'json', "
            "'imagefolder') used with `data_files`."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    data_files: dict[str, str] | None = field(
        default=None, metadata={"help": "Local files per split, e.g. {train: a.parquet, test: b.parquet}."}
    )
    task_datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "One dataset per task (domain/task-incremental): a list of {dataset_name, data_files, "
            "dataset_config_name} mappings. Overrides class splitting."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split used for training and the Fisher."})
    eval_split: str = field(default="test", metadata={"help": "Split used for the accuracy matrix."})
    text_column: str = field(default="text", metadata={"help": "Text column (sequence classification)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Optional second text column."})
    image_column: str = field(default="image", metadata={"help": "Image column (image classification)."})
    label_column: str = field(default="label", metadata={"help": "Integer class label column."})
    scenario: str = field(
        default="class_incremental",
        metadata={
            "help": "'class_incremental' (predict over all seen classes), 'task_incremental' (task id known: "
            "predict within the task's classes) or 'domain_incremental' (same labels, new domain per task)."
        },
    )
    num_tasks: int = field(default=5, metadata={"help": "Number of tasks when splitting one dataset by class."})
    class_groups: list[list[int]] | None = field(
        default=None, metadata={"help": "Explicit class ids per task, e.g. [[0, 1], [2, 3]]. Overrides num_tasks."}
    )
    class_order_seed: int | None = field(
        default=None, metadata={"help": "Shuffle the class order with this seed before splitting; null: label order."}
    )
    max_train_samples_per_class: int | None = field(default=None, metadata={"help": "Cap per class (train)."})
    max_eval_samples_per_class: int | None = field(default=None, metadata={"help": "Cap per class (eval)."})
    max_length: int = field(default=128, metadata={"help": "Tokenizer truncation length (text)."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Prompt (user turn) column of instruction-tuning data (causal LMs)."}
    )
    response_column: str = field(
        default="response", metadata={"help": "Response (assistant turn) column of instruction-tuning data."}
    )
    max_length_per_task: list[int] | None = field(
        default=None,
        metadata={
            "help": "Instruction tuning: truncation length (prompt + response tokens) of each task, one per entry of "
            "`task_datasets`; null: `max_length` for every task."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Instruction tuning: cap on training samples per task (seeded subset)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Instruction tuning: cap on eval samples per task (seeded subset)."}
    )
    use_chat_template: bool | None = field(
        default=None,
        metadata={
            "help": "Instruction tuning: format pairs with the tokenizer's chat template (true), as "
            "'prompt\\nresponse<eos>' (false), or null: the chat template when the tokenizer has one."
        },
    )

    def __post_init__(self):
        check_field_types(self)
        check_choice("scenario", self.scenario, SCENARIOS)
        check_number("num_tasks", self.num_tasks, 1, integer=True)
        check_number("class_order_seed", self.class_order_seed, 0, integer=True, optional=True)
        check_data_files("data_files", self.data_files)
        groups = self.class_groups
        if groups is not None:
            ok = isinstance(groups, list) and groups and all(isinstance(g, list) and g for g in groups)
            flat = [c for g in groups for c in g] if ok else []
            if not ok or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in flat):
                raise invalid("class_groups", groups, "give one non-empty list of class ids per task, e.g. [[0, 1]].")
            if len(flat) != len(set(flat)):
                raise invalid("class_groups", groups, "a class id may belong to one task only.")
        for name in (
            "max_train_samples_per_class",
            "max_eval_samples_per_class",
            "max_train_samples",
            "max_eval_samples",
        ):
            check_number(name, getattr(self, name), 1, integer=True, optional=True)
        check_number("max_length", self.max_length, 2, integer=True)
        for name in ("prompt_column", "response_column", "train_split", "eval_split", "label_column"):
            if not getattr(self, name):
                raise invalid(name, getattr(self, name), "give a column or split name.")
        if self.prompt_column == self.response_column:
            raise invalid("response_column", self.response_column, "use a different column than `prompt_column`.")
        lengths = self.max_length_per_task
        if lengths is not None:
            bad = not isinstance(lengths, list) or not lengths
            if bad or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lengths):
                raise invalid("max_length_per_task", lengths, "give one integer >= 2 per task, or null.")
            if isinstance(self.task_datasets, list) and len(lengths) != len(self.task_datasets):
                raise invalid(
                    "max_length_per_task",
                    lengths,
                    f"give one length per entry of `task_datasets` ({len(self.task_datasets)}), or null.",
                )
        if self.use_chat_template is not None and not isinstance(self.use_chat_template, bool):
            raise invalid("use_chat_template", self.use_chat_template, "use true, false or null (auto).")
