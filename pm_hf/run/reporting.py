"""One logging run per sequence: the `report_to` integrations (TensorBoard, W&B, ...) are created once per run, given
to every task's Trainer, and written at the sequence's step (the trainers log at step offset + their own step), so
the steps never go back; `eval_continual/*` scalars (eval/continual/* in TensorBoard) are curves over tasks; at the end
of the run the summary, the accuracy matrix and the alpha table are logged. TensorBoard writes one event file per run
to `output_dir/runs` (the tasks' Trainers do not close it; a resumed run adds one)."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerControl, TrainerState
from transformers.integrations import get_reporting_integration_callbacks

from ..hub.card import alpha_table, matrix_table


class SequenceReporters:
    """The run's reporting callbacks (from `args.report_to`), shared by the tasks' trainers."""

    def __init__(self, args, out: Path):
        names = args.report_to if isinstance(args.report_to, list) else [args.report_to]
        names = [n for n in names if n and n != "none"]
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks(names)] if names else []
        for cb in self.callbacks:
            if hasattr(cb, "tb_writer"):  # TensorBoard: one folder and one writer for the whole sequence
                cb.logging_dir = str(Path(out) / "runs")
                cb.on_train_end = _keep_open  # closed by `close()` at the end of the sequence
        self.args = args

    def log(self, step: int, logs: dict) -> None:
        """Report `logs` (numbers, or text such as markdown tables) at the sequence's step, as the Trainer would."""
        state = TrainerState(global_step=step, is_world_process_zero=self.args.process_index == 0)
        for cb in self.callbacks:
            cb.on_log(self.args, state, TrainerControl(), logs=dict(logs))

    def close(self) -> None:
        for cb in self.callbacks:
            writer = getattr(cb, "tb_writer", None)
            if writer is not None:
                writer.close()
                cb.tb_writer = None


def _keep_open(*args, **kwargs) -> None:
    """A task's `on_train_end` for TensorBoard: its writer stays open for the next task."""


def summary_logs(results: dict) -> dict:
    """What the end of the run reports (under eval/ in the trackers): ACC, AAA, BWT, forgetting, the matrix and the
    alpha table."""
    keys = ("acc", "aaa", "bwt", "forgetting")
    logs = {f"eval_continual/{k}": results[k] for k in keys if results.get(k) is not None}
    logs["eval_continual/accuracy_matrix"] = matrix_table(results)
    logs["eval_continual/alpha_table"] = alpha_table(results)
    return logs
