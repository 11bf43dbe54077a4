"""The package's boundaries, checked on the source: imports only go down the layers below, PEFT layer internals are
touched in `adapters.py` alone, the library reads the environment only where `ENVIRONMENT_READS` says (and why), and
every document it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pm_hf"
# The floors of the package: a module imports only from floors below its own, never above, and a package's own
# modules import each other without cycles (`test_no_cycles_inside_a_package`). docs/architecture.md draws this map.
LAYERS = [
    ["errors", "fileio", "timing", "version"],  # stdlib-only bases
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


# Every environment read of the library, by (module, what reads, the variable), and why. `accelerate launch` and
# `torchrun` tell the processes how they were launched only through environment variables, and pm_hf refuses a launch
# it cannot run before any model is loaded, when no Accelerator exists yet to ask; the plugins read accelerate's
# settings of their kind (ACCELERATE_DEEPSPEED_*, FSDP_*) as `Accelerator` would. Nothing else reads it.
ENVIRONMENT_READS = {
    ("distributed.launch", "parse_flag_from_env", "ACCELERATE_USE_FSDP"): "FSDP asked for by `accelerate launch`",
    ("distributed.launch", "parse_flag_from_env", "ACCELERATE_USE_DEEPSPEED"): "DeepSpeed asked for by it",
    ("distributed.launch", "parse_choice_from_env", "ACCELERATE_MIXED_PRECISION"): "its mixed precision (DeepSpeed)",
    ("distributed.launch", "get_int_from_env", "WORLD_SIZE"): "the processes started, against what the arguments see",
    ("distributed.launch", "DeepSpeedPlugin", None): "the DeepSpeed config of `accelerate launch` (its ZeRO stage)",
    ("distributed.launch", "FullyShardedDataParallelPlugin", None): "the FSDP settings of `accelerate launch`",
    ("testing", "get_int_from_env", "WORLD_SIZE"): "tests under `torchrun` on CPU start DeepSpeed's communication",
}
ENV_READERS = {"get_int_from_env", "parse_flag_from_env", "parse_choice_from_env", "str_to_bool", "patch_environment",
               "clear_environment", "DeepSpeedPlugin", "FullyShardedDataParallelPlugin"}  # fmt: skip
# Built by the library, they read the environment themselves as they always do (the process layout: RANK,
# LOCAL_RANK, ...; logging verbosity; accelerate's own settings): the launcher's contract, not a pm_hf setting.
READ_BY_THEMSELVES = {
    "accelerate.PartialState",
    "accelerate.state.AcceleratorState",
    "transformers.PreTrainedModel",
    "transformers.Trainer",
    "transformers.TrainingArguments",
    "transformers.integrations.deepspeed",
    "transformers.logging",
    "huggingface_hub.constants",
}  # fmt: skip  (HF_HUB_CACHE: where the per-repo push lock lives)
THIRD_PARTY = ("accelerate", "transformers", "huggingface_hub", "peft", "trl", "datasets", "torch", "safetensors")


def _environment_reads(tree: ast.AST, module: str) -> list[tuple]:
    """(module, reader, variable) of every call of an environment reader; os.environ / getenv / expandvars / putenv
    anywhere as (module, that name, None) (none is listed: a direct read always fails)."""
    reads = []
    for node in ast.walk(tree):
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name in ("environ", "getenv", "expandvars", "putenv", "unsetenv"):
            reads.append((module, name, None))
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if func in ENV_READERS:
                first = node.args[0] if node.args else None
                first = first.elts[0] if isinstance(first, ast.List) and first.elts else first
                reads.append((module, func, first.value if isinstance(first, ast.Constant) else None))
    return reads


def test_the_library_reads_the_environment_only_where_listed():
    found = [
        read for module, path in _modules().items() for read in _environment_reads(ast.parse(path.read_text()), module)
    ]
    assert sorted(found, key=str) == sorted(ENVIRONMENT_READS, key=str)  # each listed read once, and no other
    planted = ast.parse("import os\nos.environ.get('X')\nget_int_from_env(['RANK'], 0)\nPartialState()")
    assert sorted(_environment_reads(planted, "m")) == [("m", "environ", None), ("m", "get_int_from_env", "RANK")]


def test_every_imported_helper_that_reads_the_environment_is_accounted_for():
    """A name pm_hf imports from a dependency whose source reads the environment is a reader the scan above counts,
    or an object listed as reading it by itself: a new environment helper (e.g. `str_to_bool(os.environ[...])`'s
    cousins) cannot slip in under a name the scan does not know."""
    import importlib
    import inspect

    readers = {}
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and _top(node.module or "") in THIRD_PARTY:
                for alias in node.names:
                    try:
                        source = inspect.getsource(getattr(importlib.import_module(node.module), alias.name))
                    except (TypeError, OSError, AttributeError, ImportError):  # no Python source, or an optional extra
                        continue
                    if re.search(r"os\.environ|getenv|_from_env\(", source):
                        readers.setdefault(f"{node.module}.{alias.name}", set()).add(module)
    unaccounted = {k: v for k, v in readers.items() if k.rsplit(".", 1)[1] not in ENV_READERS}
    assert set(unaccounted) == READ_BY_THEMSELVES, sorted(unaccounted)
    assert {k.rsplit(".", 1)[1] for k in readers} & ENV_READERS  # the check sees the listed readers too


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
