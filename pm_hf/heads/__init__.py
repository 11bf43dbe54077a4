"""The class head: one row per class of the stream, its masks, and its alignment after a merge."""
