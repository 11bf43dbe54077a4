"""Configuration dataclasses: the argument groups for LoRA, the Fisher estimate, the merge, the model and the data;
`PMConfig` (a `TrainingArguments` with the perturbation knobs) is `pm_hf.training_args`, re-exported here. Every field
has help text; every check names the field, the bad value and the fix, and runs in `__post_init__` (before anything
is trained or written)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .checks import (
    check_choice,
    check_data_files,
    check_device,
    check_field_types,
    check_number,
    invalid,
)
from .training_args import HUB_STRATEGIES, PERTURBATIONS, PerturbationArguments, PMConfig  # noqa: F401 (re-exported)

FISHER_MODES = ("per_sample", "batch")
FISHER_LABELS = ("empirical", "sampled")
FISHER_NORMALIZE = ("none", "mean")
FISHER_POINTS = ("trained", "perturbed")
FISHER_CLASSES = ("task", "seen")
ALPHA_CALIBRATIONS = ("none", "secant", "branch", "curve")
ALPHA_GRANULARITIES = ("global", "module")
HEAD_ALIGN = ("none", "task", "seen", "prototypes")


# Fields that were renamed: old name -> what to use instead (a config or flag with the old name is an error).
RENAMED_FIELDS = {
    "alpha": "the field had three meanings and was split: use `fixed_alpha` (coma), `cofima_weight` (cofima) or "
    "`merge_scale` (task-arithmetic, ties, magmax)",
}


@dataclass
class LoraArguments:
    """The LoRA adapter trained for every task (a fresh one per task)."""

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(
        default=16, metadata={"help": "LoRA alpha; the scaling is alpha/r (alpha/sqrt(r) with rsLoRA)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt (suffix match, as in PEFT). null: detected from the model "
            "(query/value, q_proj/v_proj or c_attn)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Extra modules trained in full and merged with the same alpha (e.g. ['pooler']). "
            "The classification head is handled separately and need not be listed."
        },
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling alpha/sqrt(r)."})

    def __post_init__(self):
        check_field_types(self)
        check_number("r", self.r, 1, integer=True)
        check_number("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise invalid(name, value, "give a list of module names, e.g. ['query', 'value'].")


@dataclass
class FisherArguments:
    """How the diagonal Fisher F_t is estimated at theta*_t (docs/method.md, 'Fisher estimator')."""

    fisher_mode: str = field(
        default="per_sample",
        metadata={
            "help": "'per_sample': mean over samples of the squared per-sample gradient (the empirical Fisher). "
            "'batch': squared mini-batch gradients times the batch size (cheaper, coarser).",
            "choices": list(FISHER_MODES),
        },
    )
    fisher_max_samples: int | None = field(
        default=None, metadata={"help": "Cap on the number of training samples used; null uses the whole task."}
    )
    fisher_batch_size: int = field(default=16, metadata={"help": "Batch size of the Fisher pass."})
    fisher_labels: str = field(
        default="empirical",
        metadata={
            "help": "'empirical': the true labels (default). 'sampled': labels drawn from the model's predictive "
            "distribution (the true Fisher; keeps curvature on tasks fit to near-zero loss).",
            "choices": list(FISHER_LABELS),
        },
    )
    fisher_normalize: str = field(
        default="none",
        metadata={"help": "'none' or 'mean': rescale each task's Fisher to unit mean before it enters S, G and alpha."},
    )
    fisher_device: str | None = field(
        default=None, metadata={"help": "Where the Fisher is accumulated ('cpu' for large models); null: the model's."}
    )
    fisher_point: str = field(
        default="trained",
        metadata={
            "help": "Where the Fisher is taken: 'trained' (theta*_t, default) or 'perturbed' (the adapter scaled by "
            "1 - perturb_eps: the point the b = -1 branch trains, before the predictions saturate).",
            "choices": list(FISHER_POINTS),
        },
    )
    fisher_classes: str = field(
        default="task",
        metadata={
            "help": "The cross-entropy of the Fisher: over the task's classes ('task', its training loss, default) or "
            "over all classes seen so far ('seen', as CoFiMA's implementation).",
            "choices": list(FISHER_CLASSES),
        },
    )

    def __post_init__(self):
        check_field_types(self)
        check_choice("fisher_mode", self.fisher_mode, FISHER_MODES)
        check_choice("fisher_labels", self.fisher_labels, FISHER_LABELS)
        check_choice("fisher_normalize", self.fisher_normalize, FISHER_NORMALIZE)
        check_choice("fisher_point", self.fisher_point, FISHER_POINTS)
        check_choice("fisher_classes", self.fisher_classes, FISHER_CLASSES)
        check_number("fisher_max_samples", self.fisher_max_samples, 1, integer=True, optional=True)
        check_number("fisher_batch_size", self.fisher_batch_size, 1, integer=True)
        check_device("fisher_device", self.fisher_device)


@dataclass
class MergeArguments:
    """How the new task's adapter is merged into the running model (docs/method.md, stage 2)."""

    merge_method: str = field(
        default="pm",
        metadata={
            "help": "Merge strategy (`pm_hf.strategies.STRATEGIES`): 'pm' (closed-form alpha), 'seq', 'seq-merge', "
            "'average', 'coma', 'cofima', 'task-arithmetic', 'ties', 'magmax', 'oracle-alpha', 'joint'."
        },
    )
    fixed_alpha: float = field(default=0.5, metadata={"help": "'coma': the constant alpha of every merge, in [0, 1]."})
    cofima_weight: float = field(
        default=0.5,
        metadata={"help": "'cofima': the new task's weight a in w = aF / ((1 - a)S + aF), in [0, 1]."},
    )
    merge_scale: float = field(
        default=1.0,
        metadata={
            "help": "'task-arithmetic', 'ties', 'magmax': the scaling lambda of the merged task vectors, "
            "theta_0 + lambda * merge(tau_1..tau_t), in [0, 1]."
        },
    )
    alpha_clip: bool = field(default=True, metadata={"help": "Clamp the closed-form alpha to [alpha_min, 1]."})
    alpha_min: float = field(default=0.0, metadata={"help": "Lower bound of alpha when clipping, in [0, 1]."})
    alpha_granularity: str = field(
        default="global",
        metadata={"help": "'global': one alpha per task (default); 'module': one per merged module (ablation)."},
    )
    accumulator_device: str | None = field(
        default=None, metadata={"help": "Where S, G and the fp32 master weights live ('cpu' for large models)."}
    )
    merge_into: str = field(
        default="auto",
        metadata={
            "help": "Where merged LoRA deltas go: 'weights' (written into the base weights), 'adapter' (a frozen "
            "merged adapter next to the trained one; the base is never written) or 'auto' ('adapter' for a quantized "
            "base).",
            "choices": ["auto", "weights", "adapter"],
        },
    )
    merged_adapter_rank: int | None = field(
        default=None,
        metadata={
            "help": "With the merged adapter: compress it back to this rank after each merge (the best approximation; "
            "its relative error is logged). null keeps it exact (rank = the sum of the task ranks)."
        },
    )
    accumulator_dtype: str = field(
        default="float32",
        metadata={
            "help": "'pm': storage of S and G, 'float32' or 'bfloat16' (half the memory; updates computed in fp32).",
            "choices": ["float32", "bfloat16"],
        },
    )
    alpha_calibration: str = field(
        default="none",
        metadata={
            "help": "'pm': the scale of each task's Fisher (docs/method.md, calibrated closed forms). 'none': as "
            "measured (the paper). 'secant': kappa_t F_t with kappa_t = 2 dL_t / <F_t, Delta^2>, dL_t the loss the "
            "task loses at alpha = 0 on its own training data. 'branch': the same secant from the perturbation's "
            "late branch losses, 2 (L_minus - L_0) / eps^2 (falls back to 'secant'). 'curve': alpha_t minimises the "
            "measured loss of the task along alpha on a held-out part of its training data plus the old tasks' "
            "calibrated quadratic.",
            "choices": list(ALPHA_CALIBRATIONS),
        },
    )
    calibration_holdout: float = field(
        default=0.1,
        metadata={"help": "'curve': the fraction of each task's training data held out (not trained on), (0, 0.5]."},
    )
    calibration_grid: list[float] = field(
        default_factory=lambda: [i / 20 for i in range(21)],
        metadata={"help": "'curve': the alphas at which the held-out loss is measured."},
    )
    log_loss_increase: bool = field(
        default=False,
        metadata={
            "help": "Log per task the quadratic model's predicted loss increase of the task at the chosen alpha next "
            "to the one measured on its eval split (two extra passes over it; logging only)."
        },
    )
    ties_density: float = field(default=0.2, metadata={"help": "'ties': fraction of each task vector kept, (0, 1]."})
    oracle_grid: list[float] = field(
        default_factory=lambda: [i / 10 for i in range(11)],
        metadata={"help": "'oracle-alpha': the alphas tried per task (held-out accuracy on all seen tasks)."},
    )
    head_align: str = field(
        default="none",
        metadata={
            "help": "After the merge, refit the new classes' head rows on the merged model's features: 'none', "
            "'task' (cross-entropy over the task's classes), 'seen' (over all seen classes, old rows frozen) or "
            "'prototypes' (refit every seen row on class-balanced features drawn from stored per-class means and "
            "a shared covariance: no old data kept, fixed-size state).",
            "choices": list(HEAD_ALIGN),
        },
    )
    head_align_steps: int = field(default=100, metadata={"help": "Full-batch Adam steps of the head alignment."})
    head_align_lr: float = field(default=1e-2, metadata={"help": "Learning rate of the head alignment."})
    head_align_samples: int = field(
        default=256, metadata={"help": "'prototypes': pseudo-features drawn per seen class for the head alignment."}
    )
    head_align_drift: str = field(
        default="sdc",
        metadata={
            "help": "'prototypes': 'sdc' moves the stored old-class means along the feature drift measured on each "
            "new task's data (one extra forward pass over it, under the previous model); 'none' keeps them as stored.",
            "choices": ["none", "sdc"],
        },
    )

    def __post_init__(self):
        # Each strategy's knobs are checked by the strategy that owns them (`pm_hf.strategies.check_merge_args`),
        # the head-alignment knobs by `pm_hf.alignment.HeadAlignment.check_args`; both run before anything is written.
        check_field_types(self)
        if not self.merge_method:
            raise invalid("merge_method", self.merge_method, "name a merge strategy, e.g. 'pm'.")
        check_device("accumulator_device", self.accumulator_device)
        check_choice("merge_into", self.merge_into, ("auto", "weights", "adapter"))
        check_number("merged_adapter_rank", self.merged_adapter_rank, 1, integer=True, optional=True)


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
