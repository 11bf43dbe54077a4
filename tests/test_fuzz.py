"""Fuzzed inputs (scripts/reliability_tables/fuzz.py, Hypothesis derandomized, no example database): generated configs
through `pm-hf check`, bounded valid ones trained, generated task inputs through `ContinualTrainer`; each validates
or is refused by the contract. The default tier runs the table's quick sample; the slow tier the full table and the
doors as Hypothesis tests that shrink a failure to its minimal example."""

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from reliability_tables import fuzz  # noqa: E402
from reliability_tables.fuzz_cases import api_tasks, config_cases  # noqa: E402

CI = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return fuzz.prepare(tmp_path_factory.mktemp("fuzz"))


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


@pytest.mark.slow
def test_the_full_table_has_every_door_within_the_contract(tmp_path):
    for door, case, ok, detail in fuzz.rows(tmp_path, quick=False):
        assert ok, f"{door}: {case}: {detail}"


@pytest.mark.slow
@settings(CI, max_examples=300)  # (the full table tries 3000; this one shrinks a failure)
@given(config_cases())
def test_check_validates_or_refuses_by_the_contract(assets, tmp_path_factory, case):
    outcome, detail = fuzz.check_case(case, assets, tmp_path_factory.mktemp("check"))
    assert outcome in ("validated", "refused"), detail


@pytest.mark.slow
@settings(CI, max_examples=100)
@given(st.one_of(api_tasks(), api_tasks(image=True)))
def test_the_api_validates_or_raises_input_error(assets, tmp_path_factory, case):
    outcome, detail = fuzz.api_case(case, assets, tmp_path_factory.mktemp("api"))
    assert outcome in ("validated", "refused"), detail
