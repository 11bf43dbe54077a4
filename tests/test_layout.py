"""The package's boundaries, checked on the source: imports only go down the layers below, PEFT layer internals are
touched in `adapters.py` alone, the library reads no environment variables, and every document it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pm_hf"
# The floors of the package: a module imports only from floors below its own, never above, and a package's own
# modules import each other without cycles (`test_no_cycles_inside_a_package`). docs/architecture.md draws this map.
LAYERS = [
    ["errors", "fileio", "timing"],  # stdlib-only bases
    ["distributed"],  # where a weight lives, how a run is launched
    ["config", "testing"],  # PMConfig, the argument groups, presets, input checks; tiny models, Accelerate on CPU
    ["data"],  # task streams
    ["method"],  # the paper: trainer, perturbation, Fisher, merge math, strategies, weights, PEFT plumbing
    ["heads"],  # the class head and its alignment
    ["hub"],  # the repository, export folders, cards
    ["run"],  # the task loop and everything around one run
    ["continual"],  # `ContinualTrainer`
    ["commands"],  # `pm-hf`
    ["__init__", "__main__"],
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    return {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", "."): p for p in PACKAGE.rglob("*.py")}


def _top(name: str) -> str:
    return name.split(".")[0]


def _imports(path: Path, module: str) -> set[str]:
    """pm_hf modules imported by `module` (relative or absolute, at any depth in the file)."""
    package = module.split(".")[:-1]  # a package's `__init__` is named `<package>.__init__`
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
                continue  # within one package: `test_no_cycles_inside_a_package`
            if RANK[_top(target)] >= RANK[_top(module)]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_cycles_inside_a_package():
    graph = {m: {t for t in _imports(p, m) if _top(t) == _top(m) and t != m} for m, p in _modules().items()}
    graph = {m: {t if t in graph else t.rsplit(".", 1)[0] for t in targets} for m, targets in graph.items()}
    done, active = set(), []

    def visit(m):
        assert m not in active, " -> ".join([*active[active.index(m) :], m])
        if m in done:
            return
        active.append(m)
        for t in graph.get(m, ()):
            visit(t)
        active.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_peft_layer_internals_only_in_adapters():
    for module, path in _modules().items():
        text = path.read_text()
        if module != "method.adapters":
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
