"""Reliability of pm-hf runs, measured: bad configs and data must fail cleanly, killed runs must resume to identical
results, damaged checkpoints must be detected. Prints the counts; exit 1 if any case fails.

    python scripts/reliability.py                # every table, then the counts per door (train, check, evaluate,
                                                 # export, push, merge, api) and kind of case
    python scripts/reliability.py bad-configs    # or: faults, corruptions, doors, concurrency, export_faults, fuzz
    python scripts/reliability.py fuzz --quick   # a newer table's fast sample (the default test tier's)

- bad-configs: every case runs `pm-hf train` in this process; it passes when the command exits 2 with one line
  `pm-hf: error: <field> = <value>: <fix>` on stderr naming the field the case expects, no traceback, and nothing
  under the case's folder is created or changed (the output folder never created).
- faults: a run in a child process is killed with SIGKILL (or sees a full disk) at one point of the loop, then
  resumed in a second child; it passes when the first child ended by the fault itself (SIGKILL, or exit 3 on the full
  disk: any other exit is a failure) and results.json and the last checkpoint's tensors equal those of an
  uninterrupted run.
- corruptions: a copy of a finished 2-task run is damaged one way; it passes when `--resume` with one more task
  (the folder's next step) is refused by the contract (exit 2, one line `pm-hf: error: output_dir = ...`, no
  traceback) and no file of the folder changes; any other exit is a failure.
- doors, concurrency, export_faults, fuzz: the tables of scripts/reliability_tables/ (their docstrings say what a
  passing row is): bad inputs of every other door, concurrent use of one run folder or repository, SIGKILL and full
  disks in export, push, merge and Hub downloads, and Hypothesis-generated configs, flags and task inputs.
tests/test_reliability.py runs the first three tables (faults in-process, by exceptions instead of SIGKILL);
tests/test_doors.py, test_concurrency.py, test_export_faults.py and test_fuzz.py run each newer table's quick sample,
and the whole tables in the slow tier.
"""

# ruff: noqa: E402  (the offline switches must be set before transformers is imported)
from __future__ import annotations

import os

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # reliability_tables


import reliability_tables
from reliability_tables.bad_configs import BAD_CONFIGS, BadConfig, run_bad_config  # noqa: F401 (the tests use them)
from reliability_tables.common import base_config, contract_error, make_assets  # noqa: F401
from reliability_tables.corruptions import CORRUPTIONS, _snapshot, finished_run, run_corruption  # noqa: F401
from reliability_tables.faults import (  # noqa: F401
    FAULTS,
    _child,
    compare_with_reference,
    fault_points_restored,
    fault_struck,
    install_fault,
    run_fault,
    run_outputs,
)


# ------------------------------------------------------------------------------------------------- main
def _table(title: str, rows: list[tuple[str, bool, str]]) -> int:
    passed = sum(ok for _, ok, _ in rows)
    print(f"\n## {title}: {passed} / {len(rows)} passed")
    for name, ok, detail in rows:
        print(f"- [{'x' if ok else ' '}] {name}: {detail[:160]}")
    return len(rows) - passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", nargs="?", default="all", choices=["all", "bad-configs", "faults", "corruptions",
                                                                    "child", *reliability_tables.TABLES])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the fast sample of the newer tables (the default tier's)")
    parser.add_argument("config", nargs="?")
    parser.add_argument("--point")
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    if args.table == "child":
        return _child(args.config, args.point, args.nth, args.resume)
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    failures, counts = 0, {}
    with tempfile.TemporaryDirectory(prefix="pm_hf_reliability_") as tmp:
        tmp = Path(tmp)
        assets = make_assets(tmp / "assets")
        if args.table in ("all", "bad-configs"):
            rows = [(c.name, *run_bad_config(c, assets, tmp / f"bad{i}")) for i, c in enumerate(BAD_CONFIGS)]
            failures += _table("bad configs: clean error, exit 2, nothing written", rows)
            _count(counts, "train", "bad inputs", rows)
        if args.table in ("all", "corruptions"):
            finished = finished_run(assets, tmp / "finished")
            rows = [(n, *run_corruption(n, finished, assets, tmp / f"corrupt{i}")) for i, n in enumerate(CORRUPTIONS)]
            failures += _table("corruptions: detected, refused, nothing changed", rows)
            _count(counts, "train", "bad inputs", rows)
        if args.table in ("all", "faults"):
            ref_out = tmp / "reference"
            config = tmp / "reference.yaml"
            config.write_text(yaml.safe_dump(base_config(assets, ref_out)))
            subprocess.run([sys.executable, __file__, "child", str(config)], check=True, capture_output=True)
            reference = run_outputs(ref_out)
            rows = [
                (n, *run_fault(n, p, k, assets, tmp / f"fault{i}", reference)) for i, (n, p, k) in enumerate(FAULTS)
            ]
            failures += _table("faults: killed, resumed, identical results", rows)
            _count(counts, "train", "faults", rows)
        failures += _more_tables(args.table, tmp, args.quick, counts)
    return 1 if failures else 0


def _count(counts: dict, door: str, kind: str, rows: list) -> None:
    """Add a table's rows (name, ok, detail) to the per-door counts: [tried, passed]."""
    count = counts.setdefault((door, kind), [0, 0])
    count[0] += len(rows)
    count[1] += sum(bool(row[1]) for row in rows)


def _more_tables(which: str, tmp: Path, quick: bool, counts: dict) -> int:
    """The tables of scripts/reliability_tables/ (every door), then the count per door and kind of every table run."""
    import importlib

    failures = 0
    for name in reliability_tables.TABLES:
        if which not in ("all", name):
            continue
        table = importlib.import_module(f"reliability_tables.{name}")
        rows = table.rows(tmp / name, quick)
        failures += _table(
            f"{name}: {table.TITLE}", [(f"{door}: {case}", ok, detail) for door, case, ok, detail in rows]
        )
        cases = getattr(table, "case_counts", lambda row: (1, int(bool(row[2]))))  # a row may sum many cases
        for row in rows:
            tried, passed = cases(row)
            count = counts.setdefault((row[0], table.KIND), [0, 0])
            count[0], count[1] = count[0] + tried, count[1] + passed
    if counts:
        print(door_summary(counts))
    return failures


KINDS = {
    "bad inputs": "clean",
    "faults": "survived or refused",
    "concurrency": "consistent",
    "fuzzed": "by the contract",
}


def door_summary(counts: dict[tuple[str, str], list[int]]) -> str:
    """A markdown table: one row per door, `passed / tried` per kind of case."""
    doors = sorted({door for door, _ in counts}, key=lambda d: (DOORS.index(d) if d in DOORS else len(DOORS), d))
    head = "| door | " + " | ".join(f"{kind} (tried / {what})" for kind, what in KINDS.items()) + " |"
    lines = ["", "## per door", head, "|---" * (len(KINDS) + 1) + "|"]
    for door in doors:
        cells = [
            f"{counts[door, kind][0]} / {counts[door, kind][1]}" if (door, kind) in counts else "-" for kind in KINDS
        ]
        lines.append(f"| {door} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DOORS = ["train", "check", "evaluate", "export", "push", "merge", "api"]


if __name__ == "__main__":
    sys.exit(main())
