"""The paper: the perturbation, `PMTrainer`, the Fisher, merge math, strategies, weights, PEFT plumbing."""
