"""The package's boundaries, checked on the source: imports only go down the layers below, PEFT layer internals are
touched in `adapters.py` alone, the library reads no environment variables, and every document it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pm_hf"
# Lower layers never import higher ones; modules of one layer do not import each other (a package's own modules may).
LAYERS = [
    ["zero3", "errors"],
    ["sharding", "usage"],
    ["origin"],
    ["card_text"],
    ["fileio", "timing", "perturb", "images", "checks", "testing", "card", "diagnostics"],
    ["launch"],
    ["training_args", "arguments"],
    ["config", "metrics", "presets", "rundir"],
    ["merge"],
    ["adapters", "callbacks", "sources", "models", "hub", "reporting"],
    ["data", "weights"],
    ["fisher", "trainer", "heads", "instruct"],
    ["alignment", "posthoc_inputs"],
    ["strategies", "evaluation", "export"],
    ["checkpoint", "results", "measure"],
    ["run_export"],
    ["loop"],
    ["assembly"],
    ["continual", "parsing", "sft"],
    ["runs", "preflight"],
    ["posthoc"],
    ["cli", "__init__"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", "."): p for p in PACKAGE.rglob("*.py")}


def _top(name: str) -> str:
    return name.split(".")[0]


def _imports(path: Path, module: str) -> set[str]:
    """pm_hf modules imported by `module` (relative or absolute, at any depth in the file)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level and not node.module:  # from . import x
                base = package[: len(package) - node.level + 1]
                out |= {".".join([*base, a.name]) for a in node.names}
                continue
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module])
            elif node.module and node.module.startswith("pm_hf"):
                target = node.module[len("pm_hf.") :] if node.module != "pm_hf" else "__init__"
            else:
                continue
            out.add(target or "__init__")
        elif isinstance(node, ast.Import):
            out |= {a.name[len("pm_hf.") :] for a in node.names if a.name.startswith("pm_hf.")}
    return out


def test_every_module_has_a_layer():
    missing = {_top(m) for m in _modules() if not m.startswith("eval_metrics")} - set(RANK)
    assert not missing, f"add {missing} to LAYERS"


def test_imports_only_go_down():
    wrong = []
    for module, path in _modules().items():
        if module.startswith("eval_metrics"):
            continue
        for target in _imports(path, module):
            if _top(target) == _top(module):
                continue  # within one package
            if RANK[_top(target)] >= RANK[_top(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_peft_layer_internals_only_in_adapters():
    for module, path in _modules().items():
        text = path.read_text()
        if module != "adapters":
            assert "get_base_layer" not in text and ".lora_A[" not in text and ".lora_B[" not in text, module


def test_the_library_reads_no_environment():
    for module, path in _modules().items():
        text = path.read_text()
        assert not re.search(r"os\.environ|getenv|expandvars", text), module


def test_cited_documents_exist_inside_the_repository():
    cited = set()
    for path in [
        *PACKAGE.rglob("*.py"),
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(p for p in (ROOT / "configs").rglob("*") if p.is_file()),
    ]:
        text = path.read_text()
        assert "../shared" not in text and "METHOD.md" not in text, path
        cited |= set(re.findall(r"docs/[\w./-]+\.md", text))
    assert cited and all((ROOT / c).is_file() for c in cited), cited
