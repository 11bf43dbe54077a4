"""A continual run: the task loop, its assembly, checkpoint, run folder, evaluation, results, exports."""
