"""Runs on the Hub, against a recording stand-in of the Hub client (`hub_standin.FakeHub`, which keeps every repo,
commit, file, branch and tag and serves them to offline `from_pretrained` through the HF cache): the pushed layout per
`hub_strategy`, each pushed revision reloading alone with PEFT's AutoPeft class and reproducing that task's logits,
the model card's metadata against results.json, the token and its write access checked before training (whoami, then
the Hub's own auth-check/write) and never written, a sequence continued from the Hub equal to the uninterrupted run,
`pm-hf push`, and a repository holding another sequence's state pushed over only with `overwrite_hub_state`."""

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from card_checks import check_card
from conftest import groups, torchrun
from hub_standin import GOOD_TOKEN, READ_TOKEN, FakeHub, RecordingApi
from huggingface_hub import CommitOperationAdd, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

import pm_hf.hub.repository
from pm_hf.commands.cli import main as cli_main
from pm_hf.config.checks import InputError
from pm_hf.continual import ContinualTrainer, run_continual
from pm_hf.method.callbacks import ContinualCallback

TEXTS = ["a large feline of the jungle", "move fast on foot", "a feeling of deep joy", "the colour of the sky"]
EXPORT_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "pm_hf_export.json", "results.json",
                "accuracy_matrix.png", "accuracy_curve.png", "tokenizer.json", "tokenizer_config.json"}  # fmt: skip


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    monkeypatch.setattr(
        pm_hf.hub.repository, "get_token", lambda: None
    )  # no login on this machine: only hub_token counts
    return fake


class Logits(ContinualCallback):
    """The merged model's logits on fixed texts after every task (eval mode; the columns of seen classes)."""

    def __init__(self, model_dir):
        self.batch = AutoTokenizer.from_pretrained(model_dir)(TEXTS, return_tensors="pt", padding=True)
        self.rows = []

    def on_task_end(self, t, model, log):
        training = model.training
        model.eval()
        with torch.no_grad():
            self.rows.append(model(**self.batch).logits.float().clone())
        model.train(training)


def hub_groups(model_dir, out, repo="me/seq", **kw):
    kw = {"push_to_hub": True, "hub_model_id": repo, "hub_token": GOOD_TOKEN, **kw}
    return groups(model_dir, out, **kw)


@pytest.fixture(scope="module")
def pushed(model_dir, tmp_path_factory):
    """A 3-task run pushing every task with its continual state, and the logits after each task."""
    mp = pytest.MonkeyPatch()
    fake = FakeHub()
    mp.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    out = tmp_path_factory.mktemp("pushed")
    logits = Logits(model_dir)
    results = run_continual(*hub_groups(model_dir, out, push_continual_state=True), callbacks=[logits])
    yield fake, out, results, logits.rows
    mp.undo()


def test_every_task_pushes_one_tagged_commit_per_task(pushed):
    fake, out, results, _ = pushed
    creates = [c for c in fake.calls if c[0] == "create_repo"]
    assert [c[1] for c in creates] == ["me/seq"]  # one repository, no per-task Trainer repos
    main = [c for c in fake.commits("me/seq") if c["branch"] == "main"]
    assert len(main) == 3
    assert sorted(fake.repos["me/seq"]["tags"]) == ["task-1", "task-2", "task-3"]
    for t in range(3):
        files = set(fake.files("me/seq", f"task-{t + 1}"))
        assert EXPORT_FILES <= files
        state = {f for f in files if f.startswith("continual_state/")}
        assert {"continual_state/latest.json", "continual_state/results.json",
                f"continual_state/checkpoint-task{t + 1}/state.safetensors"} <= state  # fmt: skip
        assert {f"continual_state/adapters/task_{i}.safetensors" for i in range(t + 1)} <= state
        assert not any(f.startswith("base/") for f in files)
        pushed_results = json.loads(fake.files("me/seq", f"task-{t + 1}")["results.json"])
        assert pushed_results["accuracy_matrix"] == [row[: t + 1] for row in results["accuracy_matrix"][: t + 1]]
    base = fake.files("me/seq", "pm-hf-base")
    assert {"config.json", "model.safetensors"} <= set(base) and len(
        json.loads(base["config.json"])["id2label"]
    ) == 10  # the dataset's 10 classes
    config = json.loads(fake.files("me/seq")["adapter_config.json"])
    assert (config["base_model_name_or_path"], config["revision"]) == ("me/seq", "pm-hf-base")
    assert fake.files("me/seq") == fake.files("me/seq", "task-3")


def test_each_pushed_revision_reloads_alone_with_that_tasks_logits(pushed):
    fake, _, results, rows = pushed
    tok = AutoTokenizer.from_pretrained(fake.snapshot("me/seq", "task-1"))  # the tokenizer pushed beside the adapter
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    for t in range(3):
        model = AutoPeftModelForSequenceClassification.from_pretrained("me/seq", revision=f"task-{t + 1}")
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.shape[-1] == 10
        shown = (rows[t] > -1e30).all(0)  # the run's logits outside its active classes are masked
        assert shown[[2 * t, 2 * t + 1]].all()
        torch.testing.assert_close(logits[:, shown], rows[t][:, shown], atol=1e-5, rtol=1e-5)
    assert [model.config.id2label[i] for i in range(3)] == ["act", "animal", "artifact"]  # the data's label names


def test_card_parses_and_its_numbers_are_results_json(pushed):
    fake, _, results, _ = pushed
    card = check_card(fake.snapshot("me/seq"))
    data = card.data
    local = results["config"]["ModelArguments"]["model_name_or_path"]  # the tiny BERT: a local model, not the Hub's
    assert data.base_model is None and f"a local model (`{local}`" in card.text
    assert data.library_name == "peft" and data.pipeline_tag == "text-classification"
    assert {"continual-learning", "pm_hf"} <= set(data.tags)
    metrics = {r.metric_name: (r.metric_type, r.metric_value) for r in data.eval_results}
    expected = {"ACC": "acc", "AAA": "aaa", "BWT": "bwt", "forgetting": "forgetting"}
    types = {"ACC": "accuracy", "AAA": "accuracy", "BWT": "backward_transfer", "forgetting": "forgetting"}
    assert metrics == {name: (types[name], round(results[key], 6)) for name, key in expected.items()}  # fractions
    assert 'AutoPeftModelForSequenceClassification.from_pretrained("me/seq", revision="task-3")' in card.text
    for a, raw in zip(results["alphas"], results["alphas_raw"]):
        assert f"{a:.4f} | {raw:.4f}" in card.text
    for row in results["accuracy_matrix"]:
        cells = " | ".join("–" if v is None else f"{100 * v:.2f}" for v in row)
        assert cells in card.text
    assert "accuracy_matrix.png" in card.text and 'revision="task-3"' in card.text and "@inproceedings" in card.text


def test_the_token_is_never_written(pushed):
    fake, out, _, _ = pushed
    pushed_bytes = [
        data for repo in fake.repos.values() for c in repo["commits"].values() for data in c["files"].values()
    ]
    local = [p.read_bytes() for p in Path(out).rglob("*") if p.is_file()]
    assert pushed_bytes and local
    assert not any(GOOD_TOKEN.encode() in data for data in pushed_bytes + local)


def test_end_pushes_once_without_tags(hub, model_dir, tmp_path):
    results = run_continual(*hub_groups(model_dir, tmp_path / "run", repo="seq-end", hub_strategy="end",
                                        class_groups=[[0, 1], [2, 3]]))  # fmt: skip
    assert [c["branch"] for c in hub.commits("me/seq-end")] == ["pm-hf-base", "main"]
    assert hub.repos["me/seq-end"]["tags"] == {}
    files = hub.files("me/seq-end")
    assert EXPORT_FILES <= set(files) and not any(f.startswith("continual_state/") for f in files)
    assert json.loads(files["results.json"])["accuracy_matrix"] == results["accuracy_matrix"]
    assert "revision=" not in ModelCard.load(hub.snapshot("me/seq-end") / "README.md").text


@pytest.mark.parametrize(
    ("token", "field"), [(None, "hub_token"), ("hf_wrong", "hub_token"), (READ_TOKEN, "hub_token")]
)
def test_a_missing_or_refused_token_fails_before_anything_runs(hub, model_dir, tmp_path, token, field):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=rf"^{field} = ") as err:
        ContinualTrainer.from_args(*hub_groups(model_dir, out, hub_token=token))
    assert "token" in str(err.value) and (token is None or token not in str(err.value))
    assert not out.exists() and not hub.repos  # nothing loaded, trained, written or created


def _status(call) -> int:
    with pytest.raises(HfHubHTTPError) as err:
        call()
    return err.value.response.status_code


def test_the_stand_in_answers_as_the_real_client():
    fake = FakeHub()
    write, read, wrong = fake.api(token=GOOD_TOKEN), fake.api(token=READ_TOKEN), fake.api(token="hf_wrong")
    assert _status(wrong.whoami) == 401
    assert [api.whoami()["auth"]["accessToken"]["role"] for api in (write, read)] == ["write", "read"]
    assert _status(lambda: read.create_repo("me/new")) == 403 and "me/new" not in fake.repos
    assert _status(lambda: write.create_repo("other/new")) == 403 and "other/new" not in fake.repos
    assert _status(lambda: wrong.create_repo("me/new", exist_ok=True)) == 401
    write.create_repo("me/seq")
    assert _status(lambda: write.create_repo("me/seq")) == 409
    assert write.create_repo("me/seq", exist_ok=True).repo_id == "me/seq"
    fake.calls.clear()
    # HfApi.create_repo's fallback: a 403 on a repository that exists is success (asked with repo_info) ...
    assert read.create_repo("me/seq", exist_ok=True).repo_id == "me/seq"
    assert [c[0] for c in fake.calls] == ["create_repo", "repo_info"]
    # ... and the 403 itself where it does not (repo_info: 404), or where the token cannot see it
    assert _status(lambda: read.create_repo("me/none", exist_ok=True)) == 403
    fake.add_repo("other/private", private=True)
    assert _status(lambda: write.create_repo("other/private", exist_ok=True)) == 403
    with pytest.raises(RepositoryNotFoundError):
        write.repo_info("me/missing")
    with pytest.raises(RepositoryNotFoundError):
        write.repo_info("other/private")
    assert write.repo_info("me/seq").id == "me/seq"
    writes = [
        lambda: read.create_commit("me/seq", [], commit_message="x"),
        lambda: read.create_branch("me/seq", branch="b"),
        lambda: read.create_tag("me/seq", tag="t"),
    ]
    assert [_status(call) for call in writes] == [403, 403, 403]
    assert fake.commits("me/seq") == [] and set(fake.repos["me/seq"]["branches"]) == {"main"}


def test_the_stand_in_takes_only_the_real_arguments():
    fake = FakeHub()
    api = fake.api(token=GOOD_TOKEN)
    with pytest.raises(TypeError):
        api.create_repo("me/x", privat=True)
    with pytest.raises(TypeError):
        api.whoami(refresh=True)
    with pytest.raises(TypeError):
        api.create_commit("me/x", [], message="x")  # commit_message
    with pytest.raises(TypeError):
        fake.api(tokn=GOOD_TOKEN)
    assert not fake.repos and not fake.calls  # refused before it acted or recorded anything
    methods = [n for n, m in inspect.getmembers(RecordingApi, inspect.isfunction) if not n.startswith("_")]
    assert methods and all(hasattr(getattr(RecordingApi, n), "__wrapped__") for n in methods)  # each one checked


def _hub_args(repo: str, token: str, **kw) -> SimpleNamespace:
    fields = {"hub_model_id": repo, "hub_token": token, "output_dir": "run", "hub_private_repo": None}
    return SimpleNamespace(**{**fields, "hub_revision": None, **kw})


FINE_WRITE, FINE_READ = "hf_standin_fine_write_0123456789", "hf_standin_fine_read_0123456789"


@pytest.mark.parametrize(
    ("token", "repo", "field"),
    [
        (READ_TOKEN, "me/seq", "hub_token"),  # an existing repository: create_repo(exist_ok=True) would say yes
        (READ_TOKEN, "me/new", "hub_token"),
        (FINE_READ, "me/seq", "hub_token"),  # fine-grained, read permission only
        (GOOD_TOKEN, "other/theirs", "hub_model_id"),  # another user's public repository: readable, not writable
        (GOOD_TOKEN, "team/seq", "hub_model_id"),  # an organisation where the user may only read
    ],
)
def test_write_access_is_checked_before_anything_runs(monkeypatch, token, repo, field):
    fake = FakeHub(fine_grained={FINE_READ: {"me": ["repo.content.read"]}}, orgs={"team": "read"})
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    for existing in ("me/seq", "other/theirs", "team/seq"):
        fake.add_repo(existing)
    with pytest.raises(InputError, match=rf"^{field} = ") as err:
        pm_hf.hub.repository.connect(_hub_args(repo, token))
    assert token not in str(err.value)
    assert not [c for c in fake.calls if c[0] != "whoami"]  # no repository created, asked about or written


@pytest.mark.parametrize(
    ("names", "field"),
    [({"hub_model_id": "me/x/y"}, "hub_model_id"), ({"hub_model_id": "bad name"}, "hub_model_id"),
     ({"hub_model_id": None, "output_dir": "runs/my run"}, "hub_model_id"),  # named after output_dir's folder
     ({"hub_revision": "a..b"}, "hub_revision")],
)  # fmt: skip
def test_a_repository_or_branch_the_hub_would_refuse_is_refused_before_asking_it(monkeypatch, names, field):
    """Before: the token checked and the repository made, then the bad branch refused by the Hub."""
    fake = FakeHub()
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    with pytest.raises(InputError, match=rf"^{field} = .*: not a "):
        pm_hf.hub.repository.connect(_hub_args("me/seq", GOOD_TOKEN, **names))
    assert not fake.calls and not fake.repos


@pytest.mark.parametrize(("token", "repo"), [(GOOD_TOKEN, "me/seq"), (GOOD_TOKEN, "team/seq"), (FINE_WRITE, "me/seq"),
                                             (FINE_WRITE, "me/new"), (GOOD_TOKEN, "named-after-output")])  # fmt: skip
def test_a_token_that_can_write_passes_and_the_repository_is_made(monkeypatch, token, repo):
    fake = FakeHub(fine_grained={FINE_WRITE: {"me": ["repo.content.read", "repo.write"]}}, orgs=["team"])
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    fake.add_repo("me/seq")
    target = pm_hf.hub.repository.connect(_hub_args(repo, token))
    expected = repo if "/" in repo else f"me/{repo}"
    assert target.repo_id == expected and expected in fake.repos
    made = [] if expected == "me/seq" else ["create_repo"]  # an existing one is checked, not made
    assert [c[0] for c in fake.calls] == ["whoami", "auth_check", *made]
    assert fake.calls[1][2] == {"write": True}


def test_an_existing_repository_the_token_cannot_write_is_refused_by_the_hubs_own_check(monkeypatch):
    """An org contributor: `whoami` shows a write token and a writable org, `create_repo(exist_ok=True)` would say
    yes (409, then repo_info); the Hub's `auth-check/write` says 403, and nothing is created or written."""
    fake = FakeHub(orgs={"team": "contributor"})
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    fake.add_repo("team/theirs")
    assert fake.api(token=GOOD_TOKEN).create_repo("team/theirs", exist_ok=True).repo_id == "team/theirs"  # the trap
    fake.calls.clear()
    with pytest.raises(InputError, match=r"^hub_model_id = 'team/theirs': this token cannot write to it \(403\)"):
        pm_hf.hub.repository.connect(_hub_args("team/theirs", GOOD_TOKEN))
    assert [c[0] for c in fake.calls] == ["whoami", "auth_check"]
    target = pm_hf.hub.repository.connect(_hub_args("team/mine", GOOD_TOKEN))  # a contributor makes its own
    assert target.repo_id == "team/mine" and fake.repos["team/mine"]["creator"] == "me"
    assert fake.api(token=GOOD_TOKEN).auth_check("team/mine", write=True) is None


def test_the_stand_ins_auth_check_answers_as_the_hub():
    fake = FakeHub()
    fake.add_repo("me/seq")
    fake.add_repo("other/private", private=True)
    write, read, wrong = fake.api(token=GOOD_TOKEN), fake.api(token=READ_TOKEN), fake.api(token="hf_wrong")
    assert write.auth_check("me/seq", write=True) is None and read.auth_check("me/seq") is None
    assert _status(lambda: read.auth_check("me/seq", write=True)) == 403
    assert _status(lambda: write.auth_check("other/public", write=True)) == 404
    with pytest.raises(RepositoryNotFoundError):
        write.auth_check("other/private")
    assert _status(lambda: wrong.auth_check("me/seq")) == 401
    with pytest.raises(TypeError):
        write.auth_check("me/seq", writable=True)


def test_resume_from_a_pushed_repo_equals_the_uninterrupted_run(hub, model_dir, tmp_path, pushed):
    _, _, longer, _ = pushed  # the 3-task run of the same config
    first = hub_groups(model_dir, tmp_path / "a", repo="me/cont", push_continual_state=True, class_groups=[[0, 1]])
    run_continual(*first)
    second = hub_groups(model_dir, tmp_path / "b", repo="me/cont", push_continual_state=True, resume_from="me/cont")
    results = run_continual(*second)
    for key in ("accuracy_matrix", "alphas", "alphas_raw", "pre_merge_acc"):
        assert results[key] == longer[key], key
    assert sorted(hub.repos["me/cont"]["tags"]) == ["task-1", "task-2", "task-3"]
    downloads = [c for c in hub.calls if c[0] == "snapshot_download"]
    assert downloads == [("snapshot_download", "me/cont", {"revision": None, "allow_patterns": ["continual_state/*"]})]


def test_resume_from_a_tag_continues_after_that_task(hub, model_dir, tmp_path, pushed):
    fake, _, longer, _ = pushed
    hub.repos.update(fake.repos)  # the pushed 3-task sequence, continued from its tag task-1
    results = run_continual(*groups(model_dir, tmp_path / "b", resume_from="me/seq@task-1", hub_token=GOOD_TOKEN))
    assert [c for c in hub.calls if c[0] == "snapshot_download"][0][2]["revision"] == "task-1"
    for key in ("accuracy_matrix", "alphas", "alphas_raw"):
        assert results[key] == longer[key], key


def test_resume_from_a_repo_without_state_is_refused_up_front(hub, model_dir, tmp_path):
    run_continual(*hub_groups(model_dir, tmp_path / "a", repo="me/nostate", class_groups=[[0, 1]]))
    with pytest.raises(InputError, match=r"^resume_from = 'me/nostate': .*push_continual_state"):
        ContinualTrainer.from_args(*groups(model_dir, tmp_path / "b", resume_from="me/nostate", hub_token=GOOD_TOKEN))
    assert not (tmp_path / "b").exists()


def test_pm_hf_push_of_a_finished_run(hub, pushed, capsys):
    fake, out, results, _ = pushed
    argv = ["push", str(out), "--hub_model_id", "me/later", "--private", "--hub_token", GOOD_TOKEN]
    assert cli_main(argv) == 0
    assert "me/later" in capsys.readouterr().out
    assert hub.repos["me/later"]["private"] and [c["branch"] for c in hub.commits("me/later")] == ["pm-hf-base", "main"]
    files = hub.files("me/later")
    assert json.loads(files["results.json"])["accuracy_matrix"] == results["accuracy_matrix"]
    assert files["adapter_model.safetensors"] == fake.files("me/seq", "task-3")["adapter_model.safetensors"]
    assert not any(f.startswith("continual_state/") for f in files)


@pytest.mark.slow  # a 2-process launch
def test_only_the_main_process_pushes(model_dir, tmp_path):
    """Two gloo processes (torchrun): rank 0 checks access and pushes, rank 1 makes no Hub call at all."""
    rank0, rank1 = torchrun(model_dir, tmp_path, 4, "push")
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["repos"] == ["me/ddp"] and rank0["calls"].count("create_commit") == 6  # base + main, per task
    assert rank0["calls"].count("create_tag") == 3
    assert rank1["calls"] == [] and rank1["repos"] == []


def test_evaluate_a_hub_revision_on_a_data_config(pushed, monkeypatch, tmp_path, capsys):
    import yaml

    fake, _, results, _ = pushed
    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", fake.api)
    data = groups("unused", tmp_path / "unused", class_groups=[[0, 1], [2, 3]])[1]
    config = {"dataset_name": "parquet", "data_files": data.data_files, "class_groups": data.class_groups,
              "max_train_samples_per_class": 16, "max_eval_samples_per_class": 8, "max_length": 24, "seed": 3,
              "report_to": "none", "use_cpu": True}  # fmt: skip
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["evaluate", "me/seq", "--revision", "task-2", "--config", str(tmp_path / "data.yaml")]) == 0
    printed = capsys.readouterr().out
    for v in results["accuracy_matrix"][1][:2]:  # the model after task 2 on tasks 1 and 2
        assert f"{100 * v:.2f}" in printed


def test_hub_revision_pushes_to_that_branch(hub, model_dir, tmp_path):
    args = hub_groups(model_dir, tmp_path / "run", repo="me/branchy", hub_strategy="end", hub_revision="v2",
                      class_groups=[[0, 1]])  # fmt: skip
    run_continual(*args)
    assert [c["branch"] for c in hub.commits("me/branchy")] == ["pm-hf-base", "v2"]
    assert hub.files("me/branchy") == {} and "adapter_model.safetensors" in hub.files("me/branchy", "v2")


def test_the_repository_defaults_to_the_output_folder_name(hub, model_dir, tmp_path):
    args = groups(model_dir, tmp_path / "my-run", push_to_hub=True, hub_token=GOOD_TOKEN, hub_strategy="end",
                  class_groups=[[0, 1]])  # fmt: skip
    run_continual(*args)
    assert list(hub.repos) == ["me/my-run"] and "adapter_model.safetensors" in hub.files("me/my-run")


def test_a_repository_with_another_sequences_state_is_pushed_over_only_when_asked(hub, pushed, tmp_path):
    """`pm-hf push` of a finished run (`push_run_dir`) where the repository's continual_state/ is another sequence's:
    refused before anything is committed, unless `overwrite_hub_state`; its own sequence pushes over it."""
    from pm_hf.run.runs import push_run_dir

    _, out, _, _ = pushed
    push = lambda **kw: push_run_dir(out, "me/shared", token=GOOD_TOKEN, push_continual_state=True, **kw)  # noqa: E731
    push()
    push()  # the same sequence again: accepted
    state = json.loads(hub.files("me/shared")["continual_state/results.json"])
    state["config"]["fingerprints"]["tasks"][0] = "another task's data"
    (tmp_path / "other.json").write_text(json.dumps(state))
    other = hub.api(token=GOOD_TOKEN)
    op = CommitOperationAdd("continual_state/results.json", str(tmp_path / "other.json"))
    other.create_commit("me/shared", [op], commit_message="another sequence's state")
    before = hub.files("me/shared")
    with pytest.raises(InputError, match=r"^hub_model_id = 'me/shared': holds the continual state of another seq"):
        push()
    assert hub.files("me/shared") == before
    push(overwrite_hub_state=True)
    pushed_state = json.loads(hub.files("me/shared")["continual_state/results.json"])
    assert (
        pushed_state["config"]["fingerprints"]
        == json.loads((out / "results.json").read_text())["config"]["fingerprints"]
    )


def test_the_hub_switched_off_is_named_as_such_not_blamed_on_the_token(monkeypatch):
    """HF_HUB_OFFLINE=1 with a push asked for: before, 'the Hub did not accept the token (OfflineModeIsEnabled)'."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    class Offline:
        def __init__(self, token=None):
            pass

        def whoami(self):
            raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(pm_hf.hub.repository, "HfApi", Offline)
    with pytest.raises(InputError, match=r"^HF_HUB_OFFLINE = .*: the Hub is switched off: unset it to push\.$"):
        pm_hf.hub.repository.connect(_hub_args("me/seq", GOOD_TOKEN))
