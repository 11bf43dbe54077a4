"""Configuration dataclasses: the argument groups for LoRA, the Fisher estimate and the merge, and `RunConfig`, the six
groups of a run as one object; the model's and the data's (`ModelArguments`, `DataArguments`) are
`pm_hf.config.arguments` and `PMConfig` (a `TrainingArguments` with the perturbation knobs) is
`pm_hf.config.training_args`, both re-exported here. Every field has help text; every check names the field, the bad
value and the fix, and runs in `__post_init__` (before anything is trained or written)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .arguments import LM_METRICS, MODEL_TASKS, SCENARIOS, DataArguments, ModelArguments  # noqa: F401 (re-exported)
from .checks import (
    check_choice,
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
ALPHA_CALIBRATIONS = ("none", "secant", "branch", "curve")  # the built-in ones (`calibration.py` registers them)
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
            "help": "Merge strategy (`pm_hf.method.strategies.STRATEGIES`): 'pm' (closed-form alpha), 'seq', "
            "'seq-merge', 'average', 'coma', 'cofima', 'task-arithmetic', 'ties', 'magmax', 'oracle-alpha', 'joint'."
        },
    )
    merge_parameters: dict | None = field(
        default=None,
        metadata={
            "help": "Knobs that a registered strategy or calibration declares itself (`pm_hf.method.strategies.knobs."
            "Knob`) rather than as a field here, by name, e.g. {my_knob: 0.5}; each is checked by its owner."
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
            "calibrated quadratic. A calibration registered in `pm_hf.method.strategies.calibration` is named the "
            "same way.",
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
        # Each strategy's knobs are checked by the strategy that owns them (`pm_hf.method.strategies.check_merge_args`),
        # the head-alignment knobs by `pm_hf.heads.alignment.HeadAlignment.check_args`; both run before anything is
        # written.
        check_field_types(self)
        if not self.merge_method:
            raise invalid("merge_method", self.merge_method, "name a merge strategy, e.g. 'pm'.")
        check_device("accumulator_device", self.accumulator_device)
        check_choice("merge_into", self.merge_into, ("auto", "weights", "adapter"))
        check_number("merged_adapter_rank", self.merged_adapter_rank, 1, integer=True, optional=True)


@dataclass(frozen=True)
class RunConfig:
    """A run's configuration as one object: the six argument groups, in the order the CLI and `run_continual` take
    them (`groups`)."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: PMConfig
    lora_args: LoraArguments
    fisher_args: FisherArguments
    merge_args: MergeArguments

    @classmethod
    def of(cls, groups: RunConfig | tuple) -> RunConfig:
        """A `RunConfig`, or the six groups as a tuple (`parse_config`'s) made into one."""
        return groups if isinstance(groups, RunConfig) else cls(*groups)

    @property
    def groups(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def replace(self, **groups) -> RunConfig:
        """The same run with some groups replaced (the groups themselves are not copied)."""
        return dataclasses.replace(self, **groups)
