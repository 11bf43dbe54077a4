"""The Hugging Face Hub side of a run: the repository checked before any training, one commit per push (the export
folder, its card and plots, and with `push_continual_state` the state a later run continues from), a tag `task-<t>`
per task, and that state downloaded again for `resume_from`. The Trainer's own fields drive it: `push_to_hub`,
`hub_model_id`, `hub_private_repo`, `hub_revision`, `hub_token`; `hub_strategy` is `end` or `every_task`.

Layout of a pushed revision (classifiers):

    README.md  adapter_config.json  adapter_model.safetensors  pm_hf_export.json  accuracy_matrix.png
    accuracy_curve.png  tokenizer files / preprocessor_config.json  [continual_state/...]

and the branch `pm-hf-base` holds the pretrained model with a head of the run's classes, which
`adapter_config.json` names as its base (`revision="pm-hf-base"`), so `AutoPeftModelFor...` loads a revision alone.
A causal LM's adapter names the pretrained model's own Hub id instead.

Two pushes to one repository never interleave: on one machine a lock per repository id serialises them whole (the
base branch, the commit, the tag), and every commit names the commit it was built on (`parent_commit`), so the Hub
refuses it (412) when anything else changed the branch meanwhile. A repository holding the continual state of another
sequence (another model, data or method) is not pushed to unless `overwrite_hub_state` says so.

Every call goes through `HfApi`; the token is handed to it and never written or logged.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors import safe_open

from ..config.checks import InputError, invalid
from ..fileio import file_digest

logger = logging.getLogger(__name__)

BASE_BRANCH = "pm-hf-base"  # the classifier's base model (pretrained weights + a head of the run's classes)
STATE_DIR = "continual_state"  # checkpoint, adapter log and results: what `resume_from USER/NAME` continues from
HUB_ERRORS = (HfHubHTTPError, OfflineModeIsEnabled, HFValidationError, OSError, ValueError)
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")  # USER/NAME, optionally @revision (a branch or tag)


@dataclass
class HubTarget:
    """Where a run pushes: the client (holding the token), the repository and its branch."""

    api: HfApi
    repo_id: str
    revision: str | None = None
    overwrite_state: bool = False  # `overwrite_hub_state`: replace another sequence's continual state


# git's rules for a branch name (`git check-ref-format`), which the Hub applies: no control characters, spaces or
# ~^:?*[\, no '..', '@{' or '//', no part starting with '.', not starting with '-' or '/', not ending with '/', '.'
# or '.lock'
BAD_BRANCH = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|(^|/)\.|^[-/]|[/.]$|\.lock$")


def check_repo_id(value: str, field: str) -> None:
    """A repository id the Hub accepts (`huggingface_hub`'s own rules: NAME or USER/NAME, 96 characters at most)."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        reason = " ".join(str(err).split())[:160]
        raise invalid(field, value, f"not a repository id ({reason}); give USER/NAME.") from None


def check_branch(value: str | None, field: str) -> None:
    """None, or a branch name git accepts."""
    if value is not None and (not value or BAD_BRANCH.search(value)):
        fix = "not a branch name (git's rules: no spaces, '..', '~^:?*[\\', nor a part starting with '.'), e.g. exp-1."
        raise invalid(field, value, fix)


def check_hub_names(args) -> None:
    """A push's repository (`hub_model_id`, or output_dir's folder name) and branch (`hub_revision`), checked here
    before the Hub is asked anything."""
    check_repo_id(args.hub_model_id or Path(args.output_dir).absolute().name, "hub_model_id")
    check_branch(args.hub_revision, "hub_revision")


def is_repo_id(value: str) -> bool:
    return bool(REPO_ID.match(value)) and not Path(value).exists()


def _client(token: str | None, field: str, value) -> HfApi:
    token = token or get_token()
    if not token:
        fix = "no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass one (`hub_token`, `token=`)."
        raise invalid("hub_token", None, fix) if field == "hub_model_id" else invalid(field, value, fix)
    return HfApi(token=token)


def connect(args) -> HubTarget:
    """Check the token and write access to the repository (created if needed, with `hub_private_repo`) and its
    branch `hub_revision`, before anything is trained: `whoami` (the token's role and namespaces), then the Hub's
    own `auth-check/write` on an existing repository; an error names the field to fix. The repository name defaults
    to output_dir's folder name under the token's user, as with the Trainer."""
    check_hub_names(args)
    name = args.hub_model_id or Path(args.output_dir).absolute().name
    api = _client(args.hub_token, "hub_model_id", name)
    try:
        identity = api.whoami()
    except OfflineModeIsEnabled:
        raise invalid(
            "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE, "the Hub is switched off: unset it to push."
        ) from None
    except HUB_ERRORS as err:
        raise invalid("hub_token", "<hidden>", f"the Hub did not accept the token ({type(err).__name__}).") from None
    repo_id = name if "/" in name else f"{identity['name']}/{name}"
    check_write_access(identity, repo_id)
    exists = _can_write(api, repo_id)
    try:
        if not exists:  # a new repository: made now, which is itself the write check
            repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
        if args.hub_revision:
            api.create_branch(repo_id, branch=args.hub_revision, exist_ok=True)
    except HUB_ERRORS as err:
        fix = f"the repository cannot be created or written with this token ({type(err).__name__}: {err})."
        raise invalid("hub_model_id", repo_id, " ".join(fix.split())) from None
    return HubTarget(api, repo_id, args.hub_revision, bool(getattr(args, "overwrite_hub_state", False)))


def _can_write(api: HfApi, repo_id: str) -> bool:
    """True when `repo_id` exists and the token may write its content (the Hub's `auth-check/write`, which writes
    nothing), False when the token sees no such repository; a repository it sees but cannot write (403, a gated
    one included) is refused. `create_repo(exist_ok=True)` cannot tell: it turns a 403 on an existing repository
    into success."""
    try:
        api.auth_check(repo_id, write=True)
        return True
    except GatedRepoError:
        raise invalid("hub_model_id", repo_id, "a gated repository this token cannot write: use your own.") from None
    except RepositoryNotFoundError:
        return False
    except HUB_ERRORS as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            fix = f"this token cannot write to it ({status}): use a repository you can write to, or a token with "
            raise invalid("hub_model_id", repo_id, fix + "write access to it.") from None
        fix = f"its write access cannot be checked ({type(err).__name__}: {err})."
        raise invalid("hub_model_id", repo_id, " ".join(fix.split())) from None


def check_write_access(identity: dict, repo_id: str) -> None:
    """Refuse a token that `whoami` (`identity`) shows cannot write to `repo_id`: a 'read' token, a fine-grained one
    without `repo.write` on the repository or its namespace, or a namespace that is neither the token's user nor one
    of their organisations (as a member with more than read access). `create_repo(exist_ok=True)` cannot tell: it
    turns the Hub's 403 on an existing repository into success, and the push would fail after training. An identity
    that does not say (no role) is left to `create_repo`."""
    namespace = repo_id.split("/")[0]
    token = (identity.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "fineGrained":
        scopes = (token.get("fineGrained") or {}).get("scoped") or []
        here = [s for s in scopes if (s.get("entity") or {}).get("name") in (namespace, repo_id)]
        if not any("repo.write" in (s.get("permissions") or []) for s in here):
            fix = f"this fine-grained token has no 'repo.write' on {namespace!r}: add it, or use a write token."
            raise invalid("hub_token", "<hidden>", fix)
        return
    if role is not None and role not in ("write", "admin"):
        fix = f"the token's role is {role!r}: pushing needs a 'write' token (or a fine-grained one with repo.write)."
        raise invalid("hub_token", "<hidden>", fix)
    orgs = {org.get("name"): org.get("roleInOrg") for org in identity.get("orgs") or []}
    if namespace != identity.get("name") and (namespace not in orgs or orgs[namespace] == "read"):
        fix = f"the token (user {identity.get('name')!r}) cannot write under {namespace!r}: use your own namespace "
        raise invalid("hub_model_id", repo_id, fix + "or an organisation where you have write access.")


def _files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _head(target: HubTarget, revision: str | None) -> str | None:
    """The commit `revision` (a branch) points at; None for a repository without commits (or a branch not made)."""
    try:
        return target.api.repo_info(target.repo_id, revision=revision or "main").sha
    except HUB_ERRORS:
        return None


def _commit(target: HubTarget, files: dict[str, Path], message: str, revision: str | None) -> str:
    """One commit: add `files` (path in repo -> local file), delete what the revision holds besides them. It names the
    commit it was built on (`parent_commit`): a branch that moved meanwhile refuses it whole (412)."""
    parent = _head(target, revision)
    try:
        present = target.api.list_repo_files(target.repo_id, revision=parent) if parent else []
    except HUB_ERRORS:  # a new branch or an empty repository
        present = []
    stale = [p for p in present if p not in files and not fnmatch.fnmatch(p, ".gitattributes")]
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
    ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
    try:
        info = target.api.create_commit(target.repo_id, ops, commit_message=message, revision=revision,
                                        parent_commit=parent)  # fmt: skip
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code != 412:
            raise
        fix = "changed on the Hub while this push was built (another push?): nothing was committed; push again."
        raise invalid("hub_model_id", target.repo_id, fix) from None
    return info.oid


def repo_lock(repo_id: str) -> FileLock:
    """The lock that serialises this machine's pushes to `repo_id` (beside huggingface_hub's own, in the cache)."""
    path = Path(constants.HF_HUB_CACHE) / ".locks" / "pm_hf" / f"{repo_id.replace('/', '--')}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def _run_identity(config: dict) -> dict:
    """What makes a sequence: the model's and each task's data fingerprints, and the method (LoRA, Fisher, merge)."""
    groups = ("LoraArguments", "FisherArguments", "MergeArguments")
    return {"fingerprints": config.get("fingerprints", {}), **{g: config.get(g, {}) for g in groups}}


def sequence_differences(theirs: dict, ours: dict) -> list[str]:
    """How the run record `ours` is not a run of the sequence `theirs` (the same one, shorter or longer, is)."""
    a, b = _run_identity(theirs), _run_identity(ours)
    diffs = [] if a["fingerprints"].get("model") == b["fingerprints"].get("model") else ["the model"]
    tasks_a, tasks_b = a["fingerprints"].get("tasks", []), b["fingerprints"].get("tasks", [])
    if tasks_a[: len(tasks_b)] != tasks_b[: len(tasks_a)]:
        diffs.append("the tasks' data")
    diffs += [group for group in ("LoraArguments", "FisherArguments", "MergeArguments") if a[group] != b[group]]
    return diffs


def _refuse_foreign_state(target: HubTarget, export: Path, revision: str | None) -> None:
    """Refuse to push over `continual_state/` of another sequence (unless `overwrite_state`): a later `resume_from`
    of that sequence would find this run's state, or none."""
    if target.overwrite_state:
        return
    parent = _head(target, revision)
    try:
        present = target.api.list_repo_files(target.repo_id, revision=parent) if parent else []
    except HUB_ERRORS:
        return
    if f"{STATE_DIR}/results.json" not in present or not (export / "results.json").is_file():
        return
    try:
        theirs = target.api.hf_hub_download(target.repo_id, f"{STATE_DIR}/results.json", revision=parent)
        theirs = json.loads(Path(theirs).read_text()).get("config", {})
    except (*HUB_ERRORS, json.JSONDecodeError):
        return
    diffs = sequence_differences(theirs, json.loads((export / "results.json").read_text()).get("config", {}))
    if diffs:
        fix = f"holds the continual state of another sequence ({', '.join(diffs)} differ): push to another "
        raise invalid("hub_model_id", target.repo_id, fix + "repository, or set `overwrite_hub_state` to replace it.")


def push_run(target: HubTarget, export: Path, state: dict[str, Path] | None, message: str, tag: str | None) -> str:
    """Push an export folder written for this repository (its `base/`, if any, to the branch `pm-hf-base`), with the
    continual state's files (name -> local file) under `continual_state/`, as one commit; `tag` then names it.
    Returns the commit id. The whole push holds this machine's lock on the repository."""
    export = Path(export)
    with repo_lock(target.repo_id):
        _refuse_foreign_state(target, export, target.revision)
        base = export / "base"
        if base.is_dir():
            target.api.create_branch(target.repo_id, branch=BASE_BRANCH, exist_ok=True)
            _commit(target, _files(base), "pm_hf: the base model with a head of the run's classes", BASE_BRANCH)
        files = {k: v for k, v in _files(export).items() if not k.startswith("base/")}
        files.update({f"{STATE_DIR}/{name}": path for name, path in (state or {}).items()})
        oid = _commit(target, files, message, target.revision)
        if tag:
            if any(ref.name == tag for ref in target.api.list_repo_refs(target.repo_id).tags):
                target.api.delete_tag(target.repo_id, tag=tag)  # a task trained again: the tag moves to the new commit
            target.api.create_tag(target.repo_id, tag=tag, revision=oid)
    logger.info("pushed to %s (%s)", target.repo_id, tag or target.revision or "main")
    return oid


def download_state(source: str, token: str | None) -> Path:
    """The `continual_state/` folder of a pushed run `USER/NAME` (the newest) or `USER/NAME@task-3` (after task 3),
    downloaded and checked whole (`state_gaps`: every file the revision lists, each checkpoint file with the sha256
    of its manifest, each safetensors file readable); a download found cut short (a kill, a full disk, a cache left
    half-filled) is made once more from scratch, then refused, never used. An error names `resume_from`."""
    repo_id, _, revision = source.partition("@")
    api = _client(token, "resume_from", source)
    try:
        folder = Path(api.snapshot_download(repo_id, revision=revision or None, allow_patterns=[f"{STATE_DIR}/*"]))
        listed = [p for p in api.list_repo_files(repo_id, revision=revision or None) if p.startswith(f"{STATE_DIR}/")]
        if not listed:
            fix = f"the repository holds no {STATE_DIR}/: push the run with `push_continual_state: true`."
            raise invalid("resume_from", source, fix)
        gaps = state_gaps(folder, listed)
        if gaps:  # once more, every file fetched again
            logger.warning("%s/%s was downloaded incomplete (%s): downloading it again", source, STATE_DIR, gaps[0])
            folder = Path(api.snapshot_download(repo_id, revision=revision or None, allow_patterns=[f"{STATE_DIR}/*"],
                                                force_download=True))  # fmt: skip
            gaps = state_gaps(folder, listed)
    except HUB_ERRORS as err:
        if isinstance(err, InputError):
            raise
        raise invalid("resume_from", source, f"cannot download it ({type(err).__name__}: {err}).") from None
    if gaps:
        fix = f"its {STATE_DIR}/ arrived incomplete twice ({gaps[0]}; {len(gaps)} problem(s)): try again later."
        raise invalid("resume_from", source, fix)
    return folder / STATE_DIR


def state_gaps(folder: Path, listed: list[str]) -> list[str]:
    """What is wrong with a downloaded `continual_state/` (empty when it is whole): files of `listed` (paths in the
    repository) absent, latest.json not naming a checkpoint present, a checkpoint file not matching the sha256 of its
    manifest, a safetensors file that cannot be read."""
    gaps = [f"{path} is missing" for path in listed if not (folder / path).is_file()]
    state = folder / STATE_DIR
    try:
        name = str(json.loads((state / "latest.json").read_text())["checkpoint"])
        if not (state / name / "manifest.json").is_file():
            gaps.append(f"latest.json names {name!r}, which is not there")
    except (OSError, ValueError, KeyError, TypeError):
        gaps.append("latest.json is missing or unreadable")
    for manifest in sorted(state.glob("*/manifest.json")):
        try:
            recorded = json.loads(manifest.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            gaps.append(f"{manifest.parent.name}/manifest.json is unreadable")
            continue
        for file, digest in recorded.items():
            path = manifest.parent / file
            if not path.is_file() or file_digest([path]) != digest:
                gaps.append(f"{manifest.parent.name}/{file} does not match its manifest")
    for path in sorted(state.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception:  # noqa: BLE001  (safetensors raises its own error types for a cut-off file)
            gaps.append(f"{path.relative_to(state)} cannot be read")
    return gaps


def download_export(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """A pushed export (the files of one revision, without the continual state), downloaded; an error names `model`."""
    try:
        api = HfApi(token=token or get_token())
        return Path(api.snapshot_download(repo_id, revision=revision, ignore_patterns=[f"{STATE_DIR}/*"]))
    except HUB_ERRORS as err:
        fix = f"not a local folder, and cannot be downloaded ({type(err).__name__})."
        raise invalid("model", repo_id, fix) from None
