"""What pm_hf supports when a run's weights are split across the ranks (FSDP2, DeepSpeed ZeRO-3), checked where the
run is assembled: before the model is loaded (`check_split_run`: the merge rule, the Fisher, where the continual
state lives) and once it is loaded (`check_split_model`: the layers, the rows of every merged weight). A run whose
weights are whole passes both unchanged."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import invalid
from .launch import partitions_weights, sharding_field, zero_stage


def check_split_run(args, strategy, fisher_args, merge_args) -> None:
    """Before loading: a merge rule whose math runs on split weights (elementwise plus global sums), the continual
    state split beside the weights, the per-sample Fisher, merges into the weights."""
    if not partitions_weights(args):
        return
    if not strategy.shards or strategy.needs_score or strategy.needs_probe or strategy.needs_validation:
        fix = "is not available on sharded weights: use pm (calibration none), coma, average, seq-merge or sqrt-t."
        raise invalid("merge_method", strategy.name, fix)
    for field, value in (
        ("accumulator_device", merge_args.accumulator_device),
        ("fisher_device", fisher_args.fisher_device),
    ):
        if value is not None:
            raise invalid(
                field, value, "with sharded weights the continual state is sharded beside them: leave it unset."
            )
    if fisher_args.fisher_mode != "per_sample":
        raise invalid("fisher_mode", fisher_args.fisher_mode, "with FSDP2 or ZeRO-3 use 'per_sample'.")
    if merge_args.merge_into == "adapter":
        raise invalid(
            "merge_into", "adapter", "a merged adapter is not sharded yet: use 'weights' with FSDP2 or ZeRO-3."
        )


def check_split_model(args, low_rank: bool, fan_in_fan_out: bool, key_shapes: Callable[[], dict]) -> None:
    """Once loaded: no quantized base (`low_rank`: merges go to a merged adapter) or Conv1D layers (`fan_in_fan_out`)
    on split weights, and under ZeRO-3 every merged weight's rows divide among the ranks (a rank's partition must be
    whole rows, `pm_hf.distributed.zero3.partition_rows`; `key_shapes()`: the merged weights' shapes)."""
    if partitions_weights(args) and (low_rank or fan_in_fan_out):
        raise invalid(*sharding_field(args), "a quantized base or Conv1D layers (GPT-2) are not sharded yet.")
    if zero_stage(args) != 3:
        return
    uneven = {k: s for k, s in key_shapes().items() if not s or s[0] % args.world_size}
    if uneven:
        fix = f"the rows of {next(iter(uneven.items()))} do not divide among {args.world_size} processes: use FSDP2 "
        raise invalid(*sharding_field(args), fix + "or a number of processes that divides them.")
