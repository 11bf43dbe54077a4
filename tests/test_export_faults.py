"""Faults beyond training (scripts/reliability_tables/export_faults.py): `pm-hf export`, `pm-hf push`, `pm-hf merge`
and a `hub_strategy: every_task` run stopped by a kill or a full disk leave nothing half-written under a final name,
and their rerun equals an uninterrupted run (a push: the same commits, none twice, none partial); a `resume_from`
download cut short is fetched again or refused. The quick sample runs in-process (an exception stands in for
SIGKILL); the whole table, with real SIGKILLed children, is slow. Also the atomic folder writes themselves."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from reliability_tables import export_faults  # noqa: E402

from pm_hf.fileio import atomic_dir, remove_dead_temporaries  # noqa: E402


def _check_rows(rows):
    failed = [f"{door}: {case}: {detail}" for door, case, ok, detail in rows if not ok]
    assert not failed, "\n".join(failed)


@pytest.mark.slow  # a fault sweep (the default tier keeps the export round trips of tests/test_export.py)
def test_the_quick_sample_survives_every_fault(tmp_path):
    rows = export_faults.rows(tmp_path, quick=True)
    assert {door for door, *_ in rows} == {"export", "push", "merge", "train"}
    assert len(rows) == sum(c.quick for c in export_faults.CASES) + len(export_faults.QUICK_DOWNLOADS)
    _check_rows(rows)


@pytest.mark.slow  # every case, each killed in a child process (minutes)
def test_the_whole_table_survives_every_fault(tmp_path):
    rows = export_faults.rows(tmp_path, quick=False)
    assert len(rows) == len(export_faults.CASES) + len(export_faults.DOWNLOADS)
    _check_rows(rows)


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_folder_a_kill_left_moved_aside_comes_back_and_dead_temporaries_go(tmp_path):
    """Killed between the two renames of a replacement (no RENAME_EXCHANGE): the old folder is put back; a dead
    writer's temporary is removed; a live writer's stays."""
    final, dead = tmp_path / "export", _dead_pid()
    old = tmp_path / f".export.old-{dead}"
    old.mkdir()
    (old / "a.txt").write_text("old version")
    (tmp_path / f".export.tmp-{dead}").mkdir()
    live = tmp_path / f".export.tmp-{os.getppid()}"
    live.mkdir()
    assert sorted(remove_dead_temporaries(final)) == sorted([old.name, f".export.tmp-{dead}"])
    assert (final / "a.txt").read_text() == "old version"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name])


def test_replacing_a_folder_swaps_it_whole_and_a_failed_write_keeps_the_old(tmp_path):
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(OSError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and (final / "a.txt").read_text() == "one"
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["export"] and [p.name for p in final.iterdir()] == ["b.txt"]
