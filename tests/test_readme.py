"""The README's quickstart runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 3, "README should hold the ContinualTrainer example, the building blocks and the Hub load"
    return blocks


def _run(block: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(ROOT / "data")  # the examples read the committed data and tiny model
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102


def test_readme_continual_trainer_example_runs(tmp_path, monkeypatch, capsys):
    _run(_blocks()[0], tmp_path, monkeypatch)
    # DeepSpeed, when installed, prints one "Setting accelerator to CPU" line on a machine without a GPU the first
    # time transformers imports it (here, or in an earlier test): the example's own output is the rest
    lines = [line for line in capsys.readouterr().out.splitlines() if "real_accelerator.py" not in line]
    assert lines[0] == "2" and len(eval(lines[1])) == 3  # noqa: S307 - a printed list of 3 accuracies
    assert (tmp_path / "outputs" / "python_api" / "merged_adapter" / "adapter_config.json").is_file()


def test_readme_building_blocks_run(tmp_path, monkeypatch, capsys):
    _run(_blocks()[1], tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert re.search(r"alpha_1 = 1\.000", out), out


def test_readme_hub_loading_runs(model_dir, tmp_path, monkeypatch):
    """The 'Share on the Hub' snippet, against a 3-task run pushed to the recording Hub stand-in as USER/NAME."""
    from conftest import groups
    from hub_standin import GOOD_TOKEN, FakeHub

    import pm_hf.hub
    from pm_hf.continual import run_continual

    fake = FakeHub(user="USER")
    monkeypatch.setattr(pm_hf.hub, "HfApi", fake.api)
    hub = {"push_to_hub": True, "hub_model_id": "USER/NAME", "hub_token": GOOD_TOKEN}
    run_continual(*groups(model_dir, tmp_path / "run", **hub))
    scope = {"__name__": "readme"}
    exec(compile(_blocks()[2], "README.md", "exec"), scope)  # noqa: S102
    assert scope["model"].peft_config["default"].task_type == "SEQ_CLS"
