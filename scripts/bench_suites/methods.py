"""The accuracy suites of scripts/benchmark.py and the methods its runner knows: each method is a set of overrides of
the suite's config (`pm-hf train --<field> <value>`) and a one-line description, recorded in every run's JSON."""

from __future__ import annotations

from pathlib import Path

from pm_hf.config.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
SUITES = {
    "text-cil": ROOT / "configs" / "bench_text_cil.yaml",
    "vision-cil": ROOT / "configs" / "bench_vision_cil.yaml",
    "text-cil-10": ROOT / "configs" / "bench_text_cil_10.yaml",
    "vision-cil-10": ROOT / "configs" / "bench_vision_cil_10.yaml",
    # checks of the preset's first-merge limit on sequences it was not set on (docs/results.md, "The first merge")
    "vision-cil-fashion": ROOT / "configs" / "bench_vision_cil_fashion.yaml",
    "text-cil-10-order1": ROOT / "configs" / "bench_text_cil_10_order1.yaml",
    "llm-instruct": ROOT / "configs" / "llm_wordnet.yaml",  # needs scripts/convert_smollm2.py once; not in CI
    # the LLM track in a realistic regime (issue 24): 100 optimizer steps per task; needs the same conversion
    "llm-instruct-long": ROOT / "configs" / "llm_wordnet_long.yaml",
}
_NO_PERTURB = {"perturbation": "none"}
# method -> (overrides of the suite config, one-line description). Baselines train without perturbation (as in the
# paper's tables); P&M variants and the oracle train with it.
_PROTO = {"head_align": "prototypes", "head_align_drift": "sdc"}
_LOG = {"log_loss_increase": True}
# validated-alpha trials: a features pass under each trial's own weights; the first task merged at alpha = 1 (the
# knob's default until stop 44, when it became 0.5): the variants measured against that rule keep it
_EXACT = {"validation_features": "exact", "validation_first_alpha": 1.0}
_FIRST_1 = {"validation_first_alpha": 1.0}
# a method key, not a config field: the backbone's learning rate is this times the suite's `learning_rate`, the head
# keeps the full rate (`head_learning_rate`)
BACKBONE_LR_SCALE = "backbone_lr_scale"
METHODS: dict[str, tuple[dict, str]] = {
    "seq": ({"merge_method": "seq", **_NO_PERTURB}, "one LoRA continued through all tasks, no merge"),
    "seq-merge": ({"merge_method": "seq-merge", **_NO_PERTURB}, "new LoRA per task, merged with alpha = 1"),
    "average": ({"merge_method": "average", **_NO_PERTURB}, "alpha_t = 1/t (model averaging)"),
    "coma": ({"merge_method": "coma", "fixed_alpha": 0.5, **_NO_PERTURB}, "fixed alpha = 0.5"),
    "cofima": (
        {"merge_method": "cofima", "cofima_weight": 0.5, **_NO_PERTURB},
        "Fisher-weighted per parameter, a = 0.5",
    ),
    "task-arithmetic": (
        {"merge_method": "task-arithmetic", "merge_scale": 0.5, **_NO_PERTURB},
        "independent fine-tunes from theta_0, theta_0 + 0.5 sum tau",
    ),
    "ties": (
        {"merge_method": "ties", "merge_scale": 1.0, "ties_density": 0.2, **_NO_PERTURB},
        "independent fine-tunes, TIES (density 0.2, lambda 1)",
    ),
    "magmax": (
        {"merge_method": "magmax", "merge_scale": 1.0, **_NO_PERTURB},
        "sequential fine-tuning, max-magnitude merge",
    ),
    "merge-only": ({"merge_method": "pm", **_NO_PERTURB}, "closed-form alpha, no perturbation"),
    "pm": ({"merge_method": "pm", "perturbation": "task_vector"}, "P&M as specified (closed form + task-vector eps)"),
    "pm-gaussian": ({"merge_method": "pm", "perturbation": "gaussian"}, "closed form + isotropic noise"),
    # the perturbation's strength, for the LLM track's sweep (eps 0 is merge-only, eps 0.5 is pm)
    "pm-eps-0.1": ({"merge_method": "pm", "perturbation": "task_vector", "perturb_eps": 0.1}, "P&M with eps 0.1"),
    "pm-eps-0.25": ({"merge_method": "pm", "perturbation": "task_vector", "perturb_eps": 0.25}, "P&M with eps 0.25"),
    # the LLM track's candidate for its recommended settings (docs/results.md, llm-instruct-long): the closed form with
    # each task's Fisher scaled to unit mean (every task weighs the same, its Fisher says where), no perturbation
    "merge-only-fisher-mean": (
        {"merge_method": "pm", "fisher_normalize": "mean", **_NO_PERTURB},
        "closed-form alpha with each task's Fisher scaled to unit mean, no perturbation",
    ),
    "oracle-alpha": (
        {"merge_method": "oracle-alpha", "perturbation": "task_vector"},
        "P&M training, alpha per task from a 0.1 grid by accuracy on the eval sets (upper bound)",
    ),
    "joint": ({"merge_method": "joint", **_NO_PERTURB}, "all tasks' data at once (upper bound)"),
    # remedies for alpha collapse (docs/method.md): P&M + one change each
    "pm-fisher-mean": ({"merge_method": "pm", "fisher_normalize": "mean"}, "P&M, each F_t scaled to unit mean"),
    "pm-sampled": ({"merge_method": "pm", "fisher_labels": "sampled"}, "P&M, Fisher with sampled labels"),
    "pm-align": ({"merge_method": "pm", "head_align": "seen"}, "P&M + head alignment over all seen classes"),
    "pm-floor": ({"merge_method": "pm", "alpha_min": 0.2}, "P&M with alpha >= 0.2"),
    "pm-floor-0.5": ({"merge_method": "pm", "alpha_min": 0.5}, "P&M with alpha >= 0.5"),
    "pm-align-task": (
        {"merge_method": "pm", "head_align": "task"},
        "P&M + head alignment within the task's classes",
    ),
    "pm-proto": (
        get_preset("pm-proto"),  # the shipped, recommended preset itself
        "P&M + class-balanced head alignment on stored class prototypes, drift-compensated (no old data)",
    ),
    "pm-proto-nodrift": (
        {**get_preset("pm-proto"), "head_align_drift": "none"},
        "pm-proto without the drift compensation of the stored class means",
    ),
    # the preset's head alignment on two baselines: how much of pm-proto's gain is the alignment alone
    "coma-proto": (
        {
            "merge_method": "coma",
            "fixed_alpha": 0.5,
            "head_align": "prototypes",
            "head_align_drift": "sdc",
            **_NO_PERTURB,
        },
        "fixed alpha = 0.5 + the prototype head alignment of pm-proto",
    ),
    "merge-only-proto": (
        {"merge_method": "pm", "head_align": "prototypes", "head_align_drift": "sdc", **_NO_PERTURB},
        "closed-form alpha, no perturbation + the prototype head alignment of pm-proto",
    ),
    # the baselines the alpha-collapse diagnosis calls for (docs/method.md), and the oracle with the preset's head
    "fixed-1-eps": (
        {"merge_method": "coma", "fixed_alpha": 0.5, "perturbation": "task_vector", "perturb_eps": 0.5},
        "P&M training, alpha = 1 - eps = 0.5 (the point the b = -1 branch trains at)",
    ),
    "sqrt-t": ({"merge_method": "sqrt-t", "perturbation": "task_vector"}, "P&M training, alpha_t = 1/sqrt(t)"),
    "fixed-1-eps-proto": (
        {"merge_method": "coma", "fixed_alpha": 0.5, "perturbation": "task_vector", "perturb_eps": 0.5, **_PROTO},
        "fixed-1-eps + the prototype head alignment of pm-proto",
    ),
    "sqrt-t-proto": (
        {"merge_method": "sqrt-t", "perturbation": "task_vector", **_PROTO},
        "sqrt-t + the prototype head alignment of pm-proto",
    ),
    "fixed-0.2-proto": (
        {"merge_method": "coma", "fixed_alpha": 0.2, "perturbation": "task_vector", "perturb_eps": 0.5, **_PROTO},
        "P&M training, alpha = 0.2 (the oracle's range after task 1) + the prototype head alignment",
    ),
    "oracle-alpha-proto": (
        {"merge_method": "oracle-alpha", "perturbation": "task_vector", **_PROTO},
        "the oracle alpha (0.1 grid, eval-set accuracy) + the prototype head alignment: the preset's upper bound",
    ),
    # the oracle from a first merge at 0.5 (pm-validated-half's, and the preset's on the text suites): what greedy
    # choices of the merges after it reach, so that that rule's distance from oracle-alpha-proto splits into the first
    # merge's part and the later merges' (the oracles train on all of each task's data, the rule without its tenth)
    "oracle-alpha-proto-first-0.5": (
        {
            "merge_method": "oracle-alpha",
            "perturbation": "task_vector",
            **_PROTO,
            "merge_parameters": {"oracle_first_alpha": 0.5},
        },
        "oracle-alpha-proto with the first task merged at 0.5 (the preset's first alpha): a greedy per-merge bound of "
        "the merges after it",
    ),
    # calibrated closed forms (docs/method.md): the Fisher's shape, each task's scale measured
    "pm-secant": ({"merge_method": "pm", "alpha_calibration": "secant", **_LOG}, "P&M, secant-calibrated Fisher"),
    "pm-branch": (
        {"merge_method": "pm", "alpha_calibration": "branch", **_LOG},
        "P&M, Fisher calibrated by the perturbation's branch losses",
    ),
    "pm-curve": (
        {"merge_method": "pm", "alpha_calibration": "curve", **_LOG},
        "P&M, alpha from the measured held-out loss curve of the new task + calibrated old tasks",
    ),
    "pm-fisher-perturbed": (
        {"merge_method": "pm", "fisher_point": "perturbed", **_LOG},
        "P&M, the Fisher taken with the adapter at 1 - eps (where the b = -1 branch trains)",
    ),
    "pm-fisher-seen": (
        {"merge_method": "pm", "fisher_classes": "seen", **_LOG},
        "P&M, the Fisher of the cross-entropy over all seen classes",
    ),
    "pm-bf16-state": (
        {"merge_method": "pm", "perturbation": "task_vector", "accumulator_dtype": "bfloat16"},
        "pm with S and G stored in bf16 (updates in fp32): the alpha error of half the state",
    ),
    "pm-secant-proto": ({**get_preset("pm-proto"), "alpha_calibration": "secant", **_LOG}, "pm-secant + prototypes"),
    "pm-branch-proto": ({**get_preset("pm-proto"), "alpha_calibration": "branch", **_LOG}, "pm-branch + prototypes"),
    "pm-curve-proto": ({**get_preset("pm-proto"), "alpha_calibration": "curve", **_LOG}, "pm-curve + prototypes"),
    "pm-validated": (
        get_preset("pm-validated"),  # the shipped, recommended preset itself
        "P&M training + the prototype head; alpha per task from an accuracy estimate on held-out training data and "
        "drift-widened class statistics (no eval data); the first task whole where its adapter moves its held-out "
        "features by at most 5 times their spread, else at 0.5",
    ),
    # the preset of stops 44 to 46: the first task merged at 0.5 however far its adapter moves the features
    # (results/*/runs/pm-validated-half: the runs committed as pm-validated until then, rerun under this name)
    "pm-validated-half": (
        {**get_preset("pm-validated"), "merge_parameters": {"validation_first_move_limit": None}},
        "pm-validated with the first task merged at 0.5 always (the preset of stops 44 to 46)",
    ),
    # the preset before its trials' features were interpolated (results/*/runs/pm-validated-exact: its runs as they
    # were committed under pm-validated): a features pass under each trial's own weights. The variants below were
    # measured the same way and keep it (_EXACT): each compares with pm-validated-exact, one knob apart
    "pm-validated-exact": (
        {**get_preset("pm-validated"), "merge_parameters": _EXACT},
        "pm-validated, each trial's features from a pass under its own weights (not interpolated along alpha)",
    ),
    # diagnostics, not a method: pm-validated-exact with the whole grid scanned (the same choices on every committed
    # merge, scripts/validation_scan.py) and each alpha's eval score logged beside its estimate
    "pm-validated-diag": (
        {
            **get_preset("pm-validated"),
            "merge_parameters": {**_EXACT, "validation_log_eval": True, "validation_patience": 0},
        },
        "pm-validated-exact scanning the whole grid, each alpha's eval-split score logged beside its estimate "
        "(diagnostics)",
    ),
    # pm-validated choosing the first task's alpha too (by the same one-standard-error rule on its held-out data)
    "pm-validated-first": (
        {**get_preset("pm-validated"), "merge_parameters": {**_EXACT, "validation_first_task": True}},
        "pm-validated, the first task's alpha chosen too (the smallest its held-out data cannot tell from the best)",
    ),
    # the preset until stop 44: the first task merged at alpha = 1 (results/*/runs/pm-validated-first-1: the runs
    # committed under pm-validated until then, rerun under this name)
    "pm-validated-first-1": (
        {**get_preset("pm-validated"), "merge_parameters": _FIRST_1},
        "pm-validated with the first task merged at alpha = 1 (the preset until stop 44), not 0.5",
    ),
    # pm-validated scanning the second merge from theta_0 too (the first merge undone where the data ask for it)
    "pm-validated-revisit": (
        {**get_preset("pm-validated"), "merge_parameters": {**_EXACT, "validation_revisit_first": True}},
        "pm-validated, the second merge also scanned from theta_0 (the first merge undone where one error better)",
    ),
    # pm-validated with the old classes widened by the unpredicted drift of the held-out rows (not trained on)
    "pm-validated-heldout": (
        {**get_preset("pm-validated"), "merge_parameters": {**_EXACT, "validation_drift": "heldout"}},
        "pm-validated, the old classes widened by the drift of the task's held-out rows (not its training rows)",
    ),
    # pm-validated with each alpha's error of its difference from the best, paired on the same held-out samples
    "pm-validated-paired": (
        {**get_preset("pm-validated"), "merge_parameters": {**_EXACT, "validation_paired": True}},
        "pm-validated, each alpha within its paired error of the best (not the best's own error) can be chosen",
    ),
    # pm-validated with each old class's Gaussian as wide as it must be to score what the head scored on its rows
    "pm-validated-calibrated": (
        {**get_preset("pm-validated"), "merge_parameters": {**_EXACT, "validation_old_width": "calibrated"}},
        "pm-validated, each old class's Gaussian widened (at its merge) until it scores what the head scores on the "
        "class's own training rows",
    ),
    # the preset trained as a slow learner (SLCA's backbone rate), alpha still validated per task: whether slow
    # training, which text-cil-10 rewards (slow-proto), can replace the first merge at alpha = 1 (docs/results.md)
    "pm-validated-slow": (
        {**get_preset("pm-validated"), BACKBONE_LR_SCALE: 0.01, "merge_parameters": _FIRST_1},
        "pm-validated with the backbone LoRA at 0.01 x the suite's learning rate (the head at the full rate)",
    ),
    "pm-validated-slow-0.1": (
        {**get_preset("pm-validated"), BACKBONE_LR_SCALE: 0.1, "merge_parameters": _FIRST_1},
        "pm-validated with the backbone LoRA at 0.1 x the suite's learning rate (the head at the full rate)",
    ),
    # the rivals a user would pick instead (docs/baselines.md)
    "seq-proto": (
        {"merge_method": "seq-merge", **_NO_PERTURB, **_PROTO},
        "sequential LoRA (a new LoRA per task merged with alpha = 1) + the prototype head alignment",
    ),
    "slow-proto": (
        {"merge_method": "seq-merge", **_NO_PERTURB, **_PROTO, BACKBONE_LR_SCALE: 0.01},
        "slow learner (SLCA-style): backbone LoRA at 0.01 x the suite's learning rate, the head at the full rate, "
        "alpha = 1, + the prototype head alignment",
    ),
    "frozen-proto": (
        {"merge_method": "coma", "fixed_alpha": 0.0, **_NO_PERTURB, **_PROTO},
        "SimpleCIL-style (Zhou et al. 2023): the pretrained backbone kept (alpha = 0 for every task, the first too), "
        "+ the prototype head alignment",
    ),
    # PEFT's OSF and O-LoRA (docs/baselines.md): the suite's linear class head, trained on each task's classes as for
    # seq-merge (the head grows per task), no prototype alignment, no perturbation
    "osf": (
        {"merge_method": "osf", **_NO_PERTURB, BACKBONE_LR_SCALE: 0.05},
        "PEFT's OSF, one adapter continued: SVD re-taken per task, top t/T singular directions of q/v preserved, the "
        "rest trained (lr 0.05 x the suite's, the docs' 1e-5..1e-4 range; the linear head at the full rate), merged "
        "as trained",
    ),
    "olora": (
        {"merge_method": "olora", **_NO_PERTURB},
        "O-LoRA: a new LoRA per task with 0.5 sum ||A_t A_i^T||_1 against earlier tasks' A, merged with alpha = 1 "
        "(the linear head trained per task)",
    ),
}
# suite -> the method its measurements recommend, named in its summary.json (docs/results.md says why)
RECOMMENDED: dict[str, str] = {"llm-instruct-long": "merge-only-fisher-mean"}
