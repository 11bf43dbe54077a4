"""Fuzzed inputs (scripts/reliability_tables/fuzz.py, Hypothesis derandomized, no example database): generated configs
through `pm-hf check`, bounded valid ones trained, generated task inputs through `ContinualTrainer`; each validates
or is refused by the contract. The default tier runs the table's quick sample; the slow tier the full table
(`python scripts/reliability.py fuzz`: 3000 configs, 8 trained, 300 task inputs)."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from reliability_tables import fuzz  # noqa: E402

CI = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return fuzz.prepare(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.slow  # every door on a sample; tests/test_fuzz_regressions.py keeps the cases found in the default tier
def test_the_quick_table_has_every_door_within_the_contract(tmp_path):
    """Every door's row: a few hundred generated cases, none outside the contract, and each door both validates and
    refuses some (a generator that only ever produced one outcome would test nothing)."""
    rows = fuzz.rows(tmp_path, quick=True)
    assert [door for door, *_ in rows] == ["check", "train", "api"]
    for door, case, ok, detail in rows:
        assert ok, f"{door}: {case}: {detail}"
        n = int(case.split()[0])
        assert n == fuzz.QUICK[door], (door, case)
        validated, refused = (int(detail.split(" / ")[i].split()[0]) for i in (0, 1))
        assert validated >= 1 and (refused >= 1 or door == "train"), (door, detail)


def test_the_judge_counts_only_contract_refusals(tmp_path):
    """What the table accepts: exit 0, or exit 2 with one `<field> = <value>: <fix>` line and nothing written."""
    line = "pm-hf: error: r = 0: use an integer >= 1."
    assert fuzz.judge(0, "", {}, {}) == ("validated", "")
    assert fuzz.judge(2, line + "\n", {}, {}) == ("refused", line)
    assert fuzz.judge(2, line + "\n" + line, {}, {})[0] == "other"  # two error lines
    assert fuzz.judge(2, "x.py:1: FutureWarning: `a` is deprecated\n" + line, {}, {}) == ("refused", line)
    assert fuzz.judge(2, "Traceback (most recent call last):\n" + line, {}, {})[0] == "other"
    assert fuzz.judge(2, "pm-hf: error: training arguments = None: x", {}, {})[0] == "other"  # field not one word
    assert fuzz.judge(1, line, {}, {})[0] == "other"
    assert fuzz.judge(2, line, {}, {"out": None})[0] == "other"  # a folder created
    assert fuzz.judge(0, "", {"a": b"1"}, {"a": b"2"})[0] == "other"  # a file changed


@pytest.mark.slow  # in a fresh interpreter: nothing another test left patched can reach it (about 3 min)
def test_the_full_table_has_every_door_within_the_contract():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "reliability.py"), "fuzz"], capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    rows = [line for line in run.stdout.splitlines() if line.startswith("- [")]
    assert run.returncode == 0 and len(rows) == 3 and all(r.startswith("- [x]") for r in rows), run.stdout[-3000:]
