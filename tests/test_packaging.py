"""Packaging properties: `pm-hf --help` (and every subcommand's) loads no heavy library, `import pm_hf` works without
the POSIX-only modules `fcntl` and `resource`, every public name still resolves, and the installed version (what the
model cards name) is `pm_hf.__version__`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "accelerate", "deepspeed", "matplotlib", "sklearn")


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home"), "COLUMNS": "100", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


LOADED_AFTER_HELP = """
import sys
from pm_hf.commands.cli import main
try:
    main({argv!r})
except SystemExit as exit_info:
    assert exit_info.code == 0, exit_info.code
heavy = [m for m in {heavy!r} if m in sys.modules]
assert not heavy, f"--help imported {{heavy}}"
"""


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"], ["evaluate", "--help"], ["export", "--help"],
                                  ["push", "--help"], ["merge", "--help"]])  # fmt: skip
def test_help_imports_no_heavy_library(argv, tmp_path):
    proc = _python(LOADED_AFTER_HELP.format(argv=argv, heavy=HEAVY), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: pm-hf" in proc.stdout


def test_train_help_is_kept_and_then_read_without_heavy_libraries(tmp_path, monkeypatch):
    """`pm-hf train --help` lists TrainingArguments' fields, which takes transformers: the first call keeps the text
    (in ~/.cache/pm_hf/help), later ones print it without importing anything heavy."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "100")
    from pm_hf.commands.cli import train_help
    from pm_hf.commands.parsing import build_parser

    text = train_help()
    assert text == build_parser(cli_options=True).format_help()
    assert len(list((tmp_path / "home" / ".cache" / "pm_hf" / "help").glob("train-*.txt"))) == 1
    proc = _python(LOADED_AFTER_HELP.format(argv=["train", "--help"], heavy=HEAVY), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text and "TrainingArguments (inherited)" in proc.stdout


def test_import_needs_neither_fcntl_nor_resource(tmp_path):
    """Windows has neither: the package, its public names and the CLI import without them."""
    code = """
import sys
sys.modules["fcntl"] = None
sys.modules["resource"] = None
import pm_hf
from pm_hf import errors
from pm_hf.commands import cli, usage
assert set(pm_hf.__all__) <= set(dir(pm_hf)), sorted(set(pm_hf.__all__) - set(dir(pm_hf)))
assert all(pm_hf.LAZY[name] for name in pm_hf.__all__)
try:
    cli.main(["--help"])
except SystemExit as exit_info:
    assert exit_info.code == 0
"""
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr


def _top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:  # module level only: a guarded import inside a function is fine
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_posix_only_modules_at_top_level():
    """torch and transformers import `resource` themselves on Linux (through psutil), so the full stack cannot run with
    it blocked here: every pm_hf module is read instead."""
    offenders = [
        f"{path.relative_to(ROOT)}: {sorted(bad)}"
        for path in sorted((ROOT / "pm_hf").rglob("*.py"))
        if (bad := _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))) & {"fcntl", "resource"})
    ]
    assert not offenders


def test_the_installed_version_is_the_package_version():
    from importlib.metadata import version

    import pm_hf

    assert version("pm_hf") == pm_hf.__version__  # pyproject.toml reads it: one place


def test_public_names_resolve():
    import pm_hf

    for name in pm_hf.__all__:
        assert getattr(pm_hf, name) is not None, name
    from pm_hf import ContinualTrainer, PMConfig, merge_task  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pm_hf.nope  # noqa: B018


def test_a_run_without_deepspeed_neither_imports_it_nor_warns_about_peft(tmp_path):
    """A Trainer built and a LoRA adapter attached, as a run without DeepSpeed does: deepspeed stays unimported (no
    "Setting accelerator to CPU" line) and PEFT's read of `is_gradient_checkpointing` prints no FutureWarning."""
    code = f"""
import sys
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
from pm_hf.method.adapters import attach_lora
from pm_hf.config.groups import LoraArguments
import pm_hf.distributed.launch  # noqa: F401 (imported by every run)
model = AutoModelForSequenceClassification.from_pretrained({str(ROOT / "data" / "tiny-bert")!r}, num_labels=2)
model = attach_lora(model, LoraArguments(r=2, target_modules=["query", "value"]), trainable_modules=["classifier"])
args = TrainingArguments(output_dir={str(tmp_path / "out")!r}, use_cpu=True, report_to="none")
Trainer(model=model, args=args)
assert "deepspeed" not in sys.modules, "a run without DeepSpeed imported it"
"""
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "is_gradient_checkpointing" not in proc.stderr and "Setting accelerator" not in proc.stdout + proc.stderr


def test_plots_without_matplotlib_name_the_extra_and_a_run_still_writes_its_results(tmp_path, monkeypatch, caplog):
    from pm_hf.errors import MissingExtraError
    from pm_hf.run import metrics, results

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"matplotlib, not installed: pip install 'pm_hf\[plots\]'"):
        metrics.plot_accuracy_matrix([[0.5]], tmp_path / "matrix.png")
    results.write_outputs(tmp_path, {"accuracy_matrix": [[0.5]]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert "pm_hf[plots]" in caplog.text


def test_generation_scores_without_rouge_score_name_the_extra_before_training(monkeypatch):
    from pm_hf.errors import MissingExtraError
    from pm_hf.run.evaluation import CausalLMEvaluator

    monkeypatch.setitem(sys.modules, "rouge_score", None)
    with pytest.raises(MissingExtraError, match=r"rouge_score, not installed: pip install 'pm_hf\[text-metrics\]'"):
        CausalLMEvaluator(None, None, None, batch_size=1, max_new_tokens=1, primary="rougeL")
