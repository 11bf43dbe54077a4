"""The tables of scripts/reliability.py beyond its first three (bad configs, corruptions, killed runs).

A table is a module here with
    KIND: str         one of "bad inputs", "faults", "concurrency", "fuzzed"
    TITLE: str        what a passing row means, one line
    def rows(work: Path, quick: bool) -> list[Row]
where Row = (door, case, ok, detail): door is "train", "check", "evaluate", "export", "push", "merge" or "api";
`quick` is the fast sample the default test tier runs, the full table runs otherwise (and in the slow tier).
TABLES names them in the order they print.
"""

TABLES: list[str] = ["doors", "concurrency", "export_faults", "fuzz"]
