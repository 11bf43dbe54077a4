"""The head alignment remedies of docs/method.md as a `ContinualCallback` (`HeadAlignment`): after each merge the
head rows are refitted on the merged model's features — on the task's data ('task', 'seen') or on class-balanced
pseudo-features from per-class statistics kept as the callback's state ('prototypes', optionally with semantic drift
compensation). The backbone is never touched."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..config.checks import check_choice, check_number
from ..config.groups import HEAD_ALIGN, MergeArguments
from ..distributed.placement import placement_of
from ..method.callbacks import ContinualCallback
from ..method.fisher import by_length
from ..timing import Timer
from .estimate import calibrated_width, pooled_covariance, pseudo_accuracy
from .head import Head


@torch.no_grad()
def head_features(
    model: nn.Module, head: nn.Module, dataset, collate_fn, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (fp32 features, flattened) and the labels of `dataset` under the model, in dataset order.
    The batches take the examples longest first (`by_length`: little padding; an example's features depend on its
    batch only through rounding: the same rows in the same batches give the same bits) and the rows are put back in
    dataset order."""
    feats, labels = [], []

    def grab(module, args):
        feats.append(args[0].detach().float().reshape(args[0].shape[0], -1))

    order = by_length(dataset, range(len(dataset)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    handle = head.register_forward_pre_hook(grab)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with placement_of(model).forward_ready(model):  # ZeRO-3 before its hooks are on: whole for the pass
            for batch in loader:
                labels.append(batch.pop("labels"))
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
        model.train(was_training)
    return _in_order(torch.cat(feats), order), _in_order(torch.cat(labels), order)


def _in_order(rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Rows computed in `order` put back at their positions (row k belongs to example order[k])."""
    out = torch.empty_like(rows)
    out[torch.tensor(order, dtype=torch.long)] = rows
    return out


def fit_head_rows(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: list[int],
    classes: list[int],
    steps: int = 100,
    lr: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit head rows `rows` (weight and bias) by full-batch Adam on cross-entropy over the logits of `classes`,
    starting from their current values; every other row is returned unchanged (head alignment, docs/method.md).
    Deterministic: full-batch Adam draws nothing at random.

    Args:
        features: [N, d] inputs of the head; labels: [N] global class ids (each in `classes`).
        weight: [C, d] and bias: [C] (or None) of the head.
        rows: the rows to refit (the new classes); classes: the logits the loss runs over (task or all seen).

    Returns:
        New (weight, bias) tensors (inputs are not modified).
    """
    if not set(rows) <= set(classes):
        raise ValueError(f"head alignment: rows {rows} must be among the classes {classes} the loss runs over.")
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


def pad_class_stats(stats: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """Class statistics with rows for `num_classes` (zeros for classes added since; a copy)."""
    if not stats or len(stats["count"]) >= num_classes:
        return dict(stats)
    extra = num_classes - len(stats["count"])
    mean = torch.cat([stats["mean"], stats["mean"].new_zeros(extra, stats["mean"].shape[1])])
    return {
        "mean": mean,
        "count": torch.cat([stats["count"], stats["count"].new_zeros(extra)]),
        "scatter": stats["scatter"],
    }


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


class HeadAlignment(ContinualCallback):
    """After each merge, refit head rows on the merged model's features (docs/method.md, remedies).

    'task' / 'seen': the new classes' rows on the task's data, with cross-entropy over the task's classes or over all
    seen classes (old rows frozen). 'prototypes': the task's features are added to per-class statistics kept as this
    callback's state (fixed size: a mean per class and one pooled scatter, no old data); with drift 'sdc' the stored
    means of old classes first follow the feature drift measured on the task's data between theta_hat_{t-1} (taken in
    `on_task_begin`) and theta_hat_t; then every seen row is refitted on class-balanced pseudo-features drawn from
    those Gaussians. The merged backbone is never touched. Its time goes to the task's `timings["head_align"]`.
    """

    state_key = "head_align"

    def __init__(self, head: Head, stream, args: MergeArguments, batch_size: int, seed: int):
        self.check_args(args)
        self.head, self.stream, self.batch_size, self.seed = head, stream, batch_size, seed
        self.mode, self.drift = args.head_align, args.head_align_drift
        self.steps, self.lr, self.samples = args.head_align_steps, args.head_align_lr, args.head_align_samples
        self.stats: dict[str, torch.Tensor] = {}
        self.timer, self.before, self.labels, self.known = Timer("head_align"), None, None, None
        self.keep_origin, self.origin = False, {}  # the first task's statistics under theta_0 (`rebase`)
        self.width_rule, self.widths = None, None  # per class: its Gaussian's width factor (`record_widths`)

    @staticmethod
    def check_args(args: MergeArguments) -> None:
        check_choice("head_align", args.head_align, HEAD_ALIGN)
        check_choice("head_align_drift", args.head_align_drift, ("none", "sdc"))
        check_number("head_align_steps", args.head_align_steps, 1, integer=True)
        check_number("head_align_samples", args.head_align_samples, 1, integer=True)
        check_number("head_align_lr", args.head_align_lr, 0, low_open=True)

    def _features(self, model: nn.Module, task) -> tuple[torch.Tensor, torch.Tensor]:
        if self.known is not None:  # taken already under the weights the model holds (`known_features`)
            return self.known
        return head_features(model, self.head.module, task.train, self.stream.collate_fn, self.batch_size)

    @contextlib.contextmanager
    def known_features(self, pair: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
        """Within: the features and labels of the task's training rows are `pair`, taken already under the weights
        the model holds now (a trial's at the alpha merged, or theta_hat_{t-1}'s before training), used instead of a
        pass: the same weights and rows give the same features. None: a pass as usual."""
        self.known = pair
        try:
            yield
        finally:
            self.known = None

    def on_task_begin(self, t, model, task):
        self.timer, self.before, self.labels = Timer("head_align"), None, None
        if self.mode == "prototypes" and self.drift == "sdc" and (t > 0 or self.keep_origin):
            with self.timer("head_align"):  # under theta_hat_{t-1}: the old means' drift is measured against it
                self.before, self.labels = self._features(model, task)
        if t == 0 and self.keep_origin:  # the first task's statistics under theta_0, kept until the second merge
            rows = self.head.parameters()[0].shape[0]
            self.origin = update_class_stats({}, self.before.cpu(), self.labels.cpu(), rows)
            self.before = None  # (the first merge measures no drift)

    def on_merge(self, t, model, task):
        with self.timer("head_align"):
            self._align(t, model, task)
            if self.width_rule is not None and self.mode == "prototypes":
                self.record_widths(t, model, task)
        if t >= 1:
            self.origin = {}  # the second merge is the last that may undo the first

    @contextlib.contextmanager
    def rebased(self, before: torch.Tensor) -> Iterator[None]:
        """Within: the statistics and the task's features before training are theta_0's (the first task's statistics
        as taken before it trained, `before` the task's rows under theta_0): a trial from theta_0."""
        saved = self.stats, self.before
        self.rebase(before)
        try:
            yield
        finally:
            self.stats, self.before = saved

    def rebase(self, before: torch.Tensor) -> None:
        """The first merge undone: theta_0's statistics of the first task and `before` (the second task's rows under
        theta_0) replace theta_hat_1's; the alignment after the merge moves them from there."""
        if not self.origin:
            raise ValueError(
                "head alignment: no statistics under theta_0 were kept (keep_origin before the first task)"
            )
        self.stats, self.before = dict(self.origin), before

    def record_widths(self, t: int, model: nn.Module, task) -> None:
        """Each of the task's classes' width factor under the merged model, kept for later merges' estimates of it
        (`validation_old_width: calibrated`): the `calibrated_width` at which the class's Gaussian scores what the
        head scores on the class's own training rows (the Gaussian with the pooled covariance scores higher than the
        rows it was fitted on: real classes overlap more)."""
        held = torch.ones(0) if self.widths is None else self.widths  # (the head may have grown since: new rows 1)
        self.widths = torch.cat([held, torch.ones(len(self.stats["count"]) - len(held))])
        x, y = self.after.cpu(), self.labels.cpu()
        seen = sorted({c for prev in self.stream.tasks[: t + 1] for c in prev.classes})
        hits = self.correct(model, x, y, seen)
        place = placement_of(model)
        weight, bias = (None if p is None else place.whole(p.detach()).cpu() for p in self.head.parameters())
        cov = pooled_covariance(self.stats, seen)
        for c in task.classes:

            def score(k: float, c: int = c) -> float:  # the class's draws (its seed) from N(mean, k cov)
                return pseudo_accuracy(
                    weight, bias, self.stats["mean"][c], k * cov, c, seen, self.samples, self.seed + c
                )

            self.widths[c] = calibrated_width(score, float(hits[y == c].double().mean()))

    def on_task_end(self, t, model, log):
        log["timings"]["head_align"] = self.timer.seconds["head_align"]

    def _align(self, t: int, model: nn.Module, task) -> None:
        x, y = self._features(model, task)
        self.after, self.labels = x, y  # the task's features under the merge (read by a trial's estimate)
        weight_param, bias_param = self.head.parameters()  # after the pass (ZeRO-3: checked at rest, then written)
        seen = sorted({c for prev in self.stream.tasks[: t + 1] for c in prev.classes})
        classes, rows = (task.classes if self.mode == "task" else seen), task.classes
        if self.mode == "prototypes":
            stats = pad_class_stats(self.stats, weight_param.shape[0])
            if stats and self.before is not None:
                old = [c for c in classes if c not in task.classes and stats["count"][c] > 0]
                stats["mean"] = compensate_drift(stats["mean"], old, self.before.cpu(), x.cpu())
            self.stats = update_class_stats(stats, x.cpu(), y.cpu(), weight_param.shape[0])
            x, y = sample_class_features(self.stats, classes, self.samples, seed=self.seed + t)
            rows = classes
        place = placement_of(model)
        weight, bias = fit_head_rows(  # on the whole head (gathered where split; every rank fits the same rows)
            x,
            y.to(weight_param.device),
            place.whole(weight_param.detach()),
            None if bias_param is None else place.whole(bias_param.detach()),
            rows=rows,
            classes=classes,
            steps=self.steps,
            lr=self.lr,
        )
        with torch.no_grad():
            weight_param.copy_(place.shard_like(weight, weight_param))
            if bias_param is not None:
                bias_param.copy_(place.shard_like(bias, bias_param))

    def features_of(self, model: nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's inputs [N, d] and labels of `dataset` under `model` (one pass, fp32, no Trainer)."""
        return head_features(model, self.head.module, dataset, self.stream.collate_fn, self.batch_size)

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> torch.Tensor:
        """Per sample of features `x` [N, d] (`features_of` under `model`) with labels `y`, whether the head as it is
        predicts its class among `classes` (argmax among them): a trial's score of held-out training data."""
        place = placement_of(model)
        weight, bias = (None if p is None else place.whole(p.detach()).float() for p in self.head.parameters())
        rows = torch.tensor(classes, dtype=torch.long, device=weight.device)
        logits = torch.nn.functional.linear(x.to(weight.device), weight[rows], None if bias is None else bias[rows])
        return rows[logits.argmax(-1)].cpu() == y.cpu()

    @contextlib.contextmanager
    def subset(self, rows: list[int]) -> Iterator[None]:
        """For a trial on those rows of the task's training data: the features taken before training, of them only."""
        before, labels = self.before, self.labels
        self.before = None if before is None else before[rows]
        try:
            yield
        finally:
            self.before, self.labels = before, labels

    @contextlib.contextmanager
    def trial(self, t: int, model: nn.Module, task) -> Iterator[None]:
        """The head as this merge would align it, then exactly as before (the class statistics too): for an oracle
        that scores a merge with the head treatment the run applies."""
        stats = {k: v.clone() for k, v in self.stats.items()}
        params = [p for p in self.head.parameters() if p is not None]
        saved = [p.detach().clone() for p in params]
        try:
            self._align(t, model, task)
            yield
        finally:
            self.stats = stats
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)

    def state_dict(self):
        widths = {} if self.widths is None else {"widths/factor": self.widths}
        return {**self.stats, **{f"origin/{k}": v for k, v in self.origin.items()}, **widths}

    def load_state_dict(self, state):
        self.stats = {k: v for k, v in state.items() if "/" not in k}
        self.origin = {k.removeprefix("origin/"): v for k, v in state.items() if k.startswith("origin/")}
        self.widths = state.get("widths/factor")
