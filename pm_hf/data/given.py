"""Task streams from the Python API's objects (`ContinualTrainer(tasks=...)`, `.add_task(...)`): the list of tasks
checked as a whole (one task, or one task's rows, where the list of tasks goes), the first task fixing the modality,
and each later task prepared with the stream's processor and checked against it — all before a model is loaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets

from ..config.checks import invalid
from ..config.groups import DataArguments
from .instruct import MODALITY, CausalLMCollator, instruction_task, resolve_pad_token_id
from .streams import Task, TaskStream, collator_for, task_from_datasets, task_splits

SPLIT_TYPES = (datasets.Dataset, datasets.IterableDataset, list, tuple, Mapping)


def task_list(tasks) -> list:
    """`tasks` as a list of tasks; a single task (a DatasetDict, a dict of splits, a Dataset) or a list of rows
    given in its place is refused, as it would be read as tasks made of column values."""
    if isinstance(tasks, (Mapping, datasets.Dataset, datasets.IterableDataset, str)):
        fix = "one task where the list of tasks goes: give tasks=[task, ...] (one entry per task)."
        raise invalid("tasks", type(tasks).__name__, fix)
    tasks = list(tasks)
    if tasks and all(_is_row(entry) for entry in tasks):
        fix = "a list of rows is one task's data: give tasks=[rows] (one entry per task)."
        raise invalid("tasks", f"{len(tasks)} rows of {sorted(tasks[0])}", fix)
    return tasks


def _is_row(entry) -> bool:
    """A dict of column values (e.g. {'text': ..., 'label': 0}), not of splits."""
    return isinstance(entry, Mapping) and bool(entry) and not any(isinstance(v, SPLIT_TYPES) for v in entry.values())


def first_stream(entry, processor, data_args: DataArguments, seed: int, causal: bool) -> TaskStream:
    """The stream of the first task given as datasets: it fixes the modality (instructions, text or images)."""
    first = task_splits(0, entry, data_args)
    if causal:
        stream = TaskStream([], 0, [], MODALITY, CausalLMCollator(resolve_pad_token_id(processor)))
        stream.tasks.append(instruction_task(0, first, processor, data_args, seed))
        return stream
    task, modality, names = task_from_datasets(0, first, processor, data_args)
    labels = [names.get(c, str(c)) for c in range(max(task.classes) + 1)]
    return TaskStream([task], len(labels), labels, modality, collator_for(modality, processor))


def prepare_task(t: int, entry, stream: TaskStream, processor, data_args: DataArguments, seed: int,
                 may_stream: bool) -> tuple[Task, dict[int, str]]:  # fmt: skip
    """Task t (after the first) as the stream's modality takes it, with its label names by class; `may_stream`: a
    streamed training split is allowed (the run has max_steps and a Fisher sample size)."""
    if isinstance(entry, Task):
        return entry, {}
    entry = task_splits(t, entry, data_args)
    if stream.modality == MODALITY:
        return instruction_task(t, entry, processor, data_args, seed), {}
    task, modality, names = task_from_datasets(t, entry, processor, data_args)
    if modality != stream.modality:
        raise invalid(f"tasks[{t}]", modality, f"the sequence is {stream.modality}: use one modality.")
    if not isinstance(task.train, datasets.Dataset) and not may_stream:
        fix = "a streamed training split needs max_steps > 0 and fisher_max_samples (its Fisher sample)."
        raise invalid(f"tasks[{t}]", "IterableDataset", fix)
    return task, names


def add_label_names(stream: TaskStream, tasks: Sequence[tuple[Task, dict[int, str]]]) -> None:
    """The names of the classes the prepared `tasks` add to the stream (a class without one: its id)."""
    for task, names in tasks:
        if task.classes:
            stream.label_names += [names.get(c, str(c)) for c in range(len(stream.label_names), max(task.classes) + 1)]


def check_given_classes(tasks: Sequence[Task], first: int, data_args: DataArguments) -> None:
    """Tasks `first`.. of a sequence given as objects, as `class_groups` are checked: with a logit mask (class- and
    task-incremental) two classes or more (one class trains nothing: its masked loss is zero), and in a
    class-incremental sequence no class of an earlier task."""
    seen = {c for task in tasks[:first] for c in task.classes}
    for t in range(first, len(tasks)):
        classes = list(tasks[t].classes)
        if not classes:  # an instruction task: no classes
            continue
        if data_args.scenario != "domain_incremental" and len(classes) < 2:
            fix = (
                f"one class: under the {data_args.scenario} logit mask its loss is zero; give every task >= 2 classes."
            )
            raise invalid(f"tasks[{t}]", classes, fix)
        again = sorted(seen & set(classes))
        if data_args.scenario == "class_incremental" and again:
            fix = "classes an earlier task trained: each class belongs to one task (domain_incremental repeats them)."
            raise invalid(f"tasks[{t}]", again, fix)
        seen |= set(classes)
