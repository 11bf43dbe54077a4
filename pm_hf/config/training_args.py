"""`PMConfig`: `TrainingArguments` plus the Perturb-and-Merge perturbation (`PerturbationArguments`, shared with
TRL's configs in `pm_hf.method.sft`), the run folder's ownership, continuing another run, and the Hub fields given a
sequence's meaning. Every check names the field, the bad value and the fix, in `__post_init__`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from ..distributed.launch import check_deepspeed_config, deepspeed_config
from .checks import (
    InputError,
    check_choice,
    check_field_types,
    check_number,
    check_output_dir,
    check_training_arguments,
    invalid,
    is_number,
)

PERTURBATIONS = ("task_vector", "gaussian", "none")
HUB_STRATEGIES = ("every_task", "end")  # when a sequence pushes: after every task's merge, or once at the end


def named_field(message: str, names: list[str]) -> str | None:
    """The first field of `names` that `message` (TrainingArguments' own error) mentions, e.g. `--fp16` -> 'fp16'."""
    known = set(names)
    return next((word for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message) if word in known), None)


@dataclass
class PerturbationArguments:
    """The Perturb-and-Merge perturbation of docs/method.md (stage 1), shared by `PMConfig` and TRL's configs.

    At every optimizer step one branch b in {-1, 0, +1} is drawn with probabilities `perturb_probs` from
    (seed, task index, step), and the forward/backward runs with the active LoRA adapter's scaling multiplied by
    (1 + b * perturb_eps). In expectation this trains on L + p * eps^2 * Delta^T H Delta.
    """

    perturbation: str = field(
        default="task_vector",
        metadata={
            "help": "Perturbation during training: 'task_vector' (P&M: scale the active adapter's delta by 1+b*eps), "
            "'gaussian' (isotropic noise on the adapter's output delta with the same expected norm, an ablation) "
            "or 'none' (plain Trainer).",
            "choices": list(PERTURBATIONS),
        },
    )
    perturb_eps: float = field(
        default=0.5, metadata={"help": "Perturbation size eps: the branch b runs at theta + b*eps*Delta. >= 0."}
    )
    perturb_probs: list[float] = field(
        default_factory=lambda: [1 / 3, 1 / 3, 1 / 3],
        metadata={"help": "Probabilities of the branches (b=-1, b=0, b=+1); three non-negative numbers summing to 1."},
    )
    head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the class head (the paper: 1e-2 with LoRA at 1e-3); null: `learning_rate`."
        },
    )
    divergence_threshold: float | None = field(
        default=1000.0,
        metadata={
            "help": "Stop the run when a training loss exceeds this many times max(1, the task's first loss); a "
            "NaN or infinite loss always stops it. The last task's checkpoint stays intact. null: NaN/inf only."
        },
    )

    def check_perturbation(self) -> None:
        """The perturbation fields (call before the training arguments' own checks)."""
        check_field_types(self)
        check_choice("perturbation", self.perturbation, PERTURBATIONS)
        check_number("perturb_eps", self.perturb_eps, 0, 1, high_open=True)  # eps >= 1 flips the b=-1 branch's sign
        probs = self.perturb_probs
        ok = isinstance(probs, (list, tuple)) and len(probs) == 3 and all(is_number(p) for p in probs)
        if not ok or any(not math.isfinite(p) or p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise invalid("perturb_probs", probs, "give three non-negative probabilities for (-1, 0, +1) summing to 1.")
        self.perturb_probs = [float(p) for p in probs]
        check_number("head_learning_rate", self.head_learning_rate, 0, low_open=True, optional=True)
        check_number("divergence_threshold", self.divergence_threshold, 1, low_open=True, optional=True)


@dataclass
class PMConfig(TrainingArguments, PerturbationArguments):
    """`TrainingArguments` plus the Perturb-and-Merge perturbation (`PerturbationArguments`) and the run folder's
    ownership (`overwrite_output_dir`)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a pm_hf run already in output_dir (without it, `train` there refuses)."},
    )
    resume_from: str | None = field(
        default=None,
        metadata={
            "help": "Start a new output_dir from the last checkpoint of another run — its folder, or a Hub repository "
            "USER/NAME pushed with `push_continual_state` — then train this config's further tasks on top (the "
            "config must be that run's, with tasks appended)."
        },
    )
    hub_strategy: str = field(
        default="every_task",
        metadata={
            "help": "With push_to_hub: 'every_task' pushes after each task's merge (one commit, tagged task-<t>), "
            "'end' once after the last task."
        },
    )
    push_continual_state: bool = field(
        default=False,
        metadata={
            "help": "With push_to_hub: push the continual state too (under continual_state/), so that "
            "`--resume_from USER/NAME` continues the sequence on another machine."
        },
    )
    overwrite_hub_state: bool = field(
        default=False,
        metadata={
            "help": "With push_to_hub: push even where the repository holds the continual state of another sequence "
            "(another model, data or method), replacing it; without it such a push is refused."
        },
    )

    def __post_init__(self):
        self.check_perturbation()
        check_choice("hub_strategy", self.hub_strategy, HUB_STRATEGIES)
        check_training_arguments(self)  # after head_learning_rate: learning_rate 0 is allowed with a head lr
        check_output_dir(self.output_dir)  # a file there: refused now, not by the Trainer after loading everything
        if self.deepspeed:  # configs pm_hf cannot run refused here, before the Trainer sets DeepSpeed up
            check_deepspeed_config(deepspeed_config(self.deepspeed), "deepspeed config")
        config = self.fsdp_config if isinstance(self.fsdp_config, dict) else {}  # a JSON path: checked at launch
        if self.fsdp and int(config.get("version", config.get("fsdp_version", 2))) != 2:
            raise invalid("fsdp_config", self.fsdp_config, "pm_hf shards with FSDP2 only: set `version: 2`.")
        strategy, self.hub_strategy = self.hub_strategy, "end"  # a sequence's strategies are not the Trainer's
        try:
            super().__post_init__()
        except ValueError as err:  # TrainingArguments' own checks of combinations of fields
            message = " ".join(str(err).split())
            name = named_field(message, [f.name for f in fields(self)])
            raise invalid(name or "training_args", getattr(self, name, None) if name else None, message) from err
        self.hub_strategy = strategy


def as_pm_config(args) -> PMConfig:
    """A `PMConfig`, or a plain `TrainingArguments` taken as one, as TRL's trainers take one for their own config:
    the fields it sets (those that differ from TrainingArguments' defaults) carry over, the rest keep PMConfig's
    defaults (the perturbation's; `hub_strategy` 'every_task'); a value PMConfig does not take is refused there."""
    if isinstance(args, PMConfig):
        return args
    if type(args) is not TrainingArguments:
        fix = "give pm_hf's PMConfig (every TrainingArguments field and the perturbation's) or a TrainingArguments."
        raise invalid("args", type(args).__name__, fix)
    default = TrainingArguments(output_dir=args.output_dir)
    given = {f.name: getattr(args, f.name) for f in fields(args) if f.init}
    try:
        return PMConfig(**{k: v for k, v in given.items() if k == "output_dir" or v != getattr(default, k)})
    except InputError as err:  # its field, as the Python user gave it
        err.args = (f"args.{err}",)
        raise
