"""The README's and the docs' Python snippets run as written, and the docs list every module of the package."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# every user-pasteable python block of the README and docs/, and the test that executes it
EXECUTED = {"README.md": 1, "docs/building-blocks.md": 1, "docs/hub.md": 1}


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(encoding="utf-8"), flags=re.S)


def _block(page: str) -> str:
    blocks = _blocks(page)
    assert len(blocks) == EXECUTED[page], f"{page} should hold {EXECUTED[page]} python block(s), found {len(blocks)}"
    return blocks[0]


def _run(page: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")  # the examples read the committed data and tiny model
    exec(compile(_block(page), page, "exec"), {"__name__": "readme"})  # noqa: S102


def test_every_python_block_is_executed():
    found = {str(p.relative_to(ROOT)): len(_blocks(str(p.relative_to(ROOT)))) for p in PAGES}
    assert {page: n for page, n in found.items() if n} == EXECUTED, found


def test_readme_continual_trainer_example_runs(tmp_path, monkeypatch, capsys):
    _run("README.md", tmp_path, monkeypatch)
    # DeepSpeed, when installed, prints one "Setting accelerator to CPU" line on a machine without a GPU the first
    # time transformers imports it (here, or in an earlier test): the example's own output is the rest
    lines = [line for line in capsys.readouterr().out.splitlines() if "real_accelerator.py" not in line]
    assert lines[0] == "2" and len(eval(lines[1])) == 3  # noqa: S307 - a printed list of 3 accuracies
    assert (tmp_path / "outputs" / "python_api" / "merged_adapter" / "adapter_config.json").is_file()


def test_building_blocks_run(tmp_path, monkeypatch, capsys):
    _run("docs/building-blocks.md", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert re.search(r"alpha_1 = 1\.000", out), out


def test_hub_loading_runs(model_dir, tmp_path, monkeypatch):
    """docs/hub.md's loading snippet, against a 3-task run pushed to the recording Hub stand-in as USER/NAME."""
    from conftest import groups
    from hub_standin import GOOD_TOKEN, FakeHub

    import pm_hf.hub.repository
    from pm_hf.continual import run_continual

    fake = FakeHub(user="USER")
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    hub = {"push_to_hub": True, "hub_model_id": "USER/NAME", "hub_token": GOOD_TOKEN}
    run_continual(*groups(model_dir, tmp_path / "run", **hub))
    scope = {"__name__": "readme"}
    exec(compile(_block("docs/hub.md"), "docs/hub.md", "exec"), scope)  # noqa: S102
    assert scope["model"].peft_config["default"].task_type == "SEQ_CLS"


def test_architecture_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [p.name for p in (ROOT / "pm_hf").iterdir() if p.name != "__pycache__" and not p.name.startswith(".")]
    assert modules and all(f"`pm_hf/{m}" in text for m in modules), [m for m in modules if f"`pm_hf/{m}" not in text]


def test_relative_links_resolve():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
