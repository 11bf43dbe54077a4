"""A recording stand-in for the Hugging Face Hub: `FakeHub.api` replaces `huggingface_hub.HfApi` where pm_hf makes
its client (`pm_hf.hub.HfApi`). It keeps every created repository, commit (with its files' bytes), branch and tag,
and every call, and writes each commit into the Hugging Face cache in the standard layout (refs per branch and tag),
so that offline `from_pretrained(repo_id, revision="task-2")` — transformers, PEFT's AutoPeft classes — loads what was
pushed, through the real loading code."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import GitRefInfo, GitRefs

GOOD_TOKEN = "hf_standin_token_0123456789"


def _error(cls, status: int, message: str):
    request = httpx2.Request("GET", "https://huggingface.co/api")
    return cls(message, response=httpx2.Response(status, request=request))


class FakeHub:
    """The whole stand-in Hub: `repos[repo_id]` = {"private", "branches": {name: oid}, "tags": {name: oid},
    "commits": {oid: {"files": {path: bytes}, "message", "parent", "branch"}}}; `calls`: (method, repo_id, details)."""

    def __init__(self, user: str = "me", tokens=(GOOD_TOKEN,), cache_dir: str | Path | None = None):
        self.user, self.tokens = user, set(tokens)
        self.cache = Path(cache_dir or constants.HF_HUB_CACHE)
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.clients: list[RecordingApi] = []

    def api(self, token=None, **kwargs) -> RecordingApi:
        """Stands in for `HfApi(token=...)`."""
        client = RecordingApi(self, token)
        self.clients.append(client)
        return client

    # ------------------------------------------------------------------------------------- reading what was sent
    def repo(self, repo_id: str) -> dict:
        if repo_id not in self.repos:
            raise _error(RepositoryNotFoundError, 404, f"404 repository {repo_id} not found")
        return self.repos[repo_id]

    def resolve(self, repo_id: str, revision: str | None) -> str | None:
        repo, revision = self.repo(repo_id), revision or "main"
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["tags"]:
            return repo["tags"][revision]
        if revision in repo["commits"]:
            return revision
        raise _error(RevisionNotFoundError, 404, f"404 revision {revision} not found in {repo_id}")

    def files(self, repo_id: str, revision: str | None = None) -> dict[str, bytes]:
        oid = self.resolve(repo_id, revision)
        return dict(self.repo(repo_id)["commits"][oid]["files"]) if oid else {}

    def commits(self, repo_id: str) -> list[dict]:
        return list(self.repo(repo_id)["commits"].values())

    def snapshot(self, repo_id: str, revision: str | None = None) -> Path:
        """The cached snapshot folder of a revision (what `snapshot_download` returns)."""
        oid = self.resolve(repo_id, revision)
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / oid

    # ------------------------------------------------------------------------------------- the cache layout
    def _write_cache(self, repo_id: str, oid: str, files: dict[str, bytes]) -> None:
        root = self.cache / f"models--{repo_id.replace('/', '--')}"
        for path, data in files.items():
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                blob.write_bytes(data)
            target = root / "snapshots" / oid / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def _write_ref(self, repo_id: str, name: str, oid: str | None) -> None:
        ref = self.cache / f"models--{repo_id.replace('/', '--')}" / "refs" / name
        if oid is None:
            ref.unlink(missing_ok=True)
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(oid)


class RecordingApi:
    """The `HfApi` methods pm_hf calls, acting on a `FakeHub`."""

    def __init__(self, hub: FakeHub, token: str | None):
        self.hub, self.token = hub, token

    def _call(self, method: str, repo_id: str | None = None, **details) -> None:
        self.hub.calls.append((method, repo_id, details))

    def _authorised(self) -> None:
        if self.token not in self.hub.tokens:
            raise _error(HfHubHTTPError, 401, "401 Unauthorized: invalid token")

    def whoami(self, token=None, **kwargs) -> dict:
        self._call("whoami")
        self._authorised()
        return {"name": self.hub.user, "type": "user"}

    def create_repo(self, repo_id: str, *, private=None, exist_ok=False, **kwargs):
        self._call("create_repo", repo_id, private=private, exist_ok=exist_ok)
        self._authorised()
        if repo_id in self.hub.repos and not exist_ok:
            raise _error(HfHubHTTPError, 409, f"409 {repo_id} exists")
        self.hub.repos.setdefault(repo_id, {"private": bool(private), "branches": {"main": None}, "tags": {},
                                            "commits": {}})  # fmt: skip
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id: str, *, branch: str, revision=None, exist_ok=False, **kwargs) -> None:
        self._call("create_branch", repo_id, branch=branch)
        self._authorised()
        repo = self.hub.repo(repo_id)
        if branch in repo["branches"]:
            if not exist_ok:
                raise _error(HfHubHTTPError, 409, f"409 branch {branch} exists")
            return
        repo["branches"][branch] = self.hub.resolve(repo_id, revision)
        self.hub._write_ref(repo_id, branch, repo["branches"][branch])

    def list_repo_files(self, repo_id: str, *, revision=None, **kwargs) -> list[str]:
        self._call("list_repo_files", repo_id, revision=revision)
        return sorted(self.hub.files(repo_id, revision))

    def list_repo_refs(self, repo_id: str, **kwargs) -> GitRefs:
        repo = self.hub.repo(repo_id)
        refs = lambda kind, prefix: [  # noqa: E731
            GitRefInfo(name=n, ref=f"refs/{prefix}/{n}", target_commit=o or "") for n, o in repo[kind].items()
        ]
        return GitRefs(branches=refs("branches", "heads"), converts=[], tags=refs("tags", "tags"))

    def create_commit(self, repo_id: str, operations, *, commit_message: str, revision=None, **kwargs):
        self._authorised()
        repo, branch = self.hub.repo(repo_id), revision or "main"
        if branch not in repo["branches"]:
            raise _error(RevisionNotFoundError, 404, f"404 branch {branch} not found")
        parent = repo["branches"][branch]
        files = dict(repo["commits"][parent]["files"]) if parent else {}
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                files[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            elif isinstance(op, CommitOperationDelete):
                files.pop(op.path_in_repo, None)
        digest = hashlib.sha1(str(parent).encode() + commit_message.encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha256(files[path]).digest())
        oid = digest.hexdigest()
        repo["commits"][oid] = {"files": files, "message": commit_message, "parent": parent, "branch": branch}
        repo["branches"][branch] = oid
        self.hub._write_cache(repo_id, oid, files)
        self.hub._write_ref(repo_id, branch, oid)
        paths = lambda kind: sorted(op.path_in_repo for op in operations if isinstance(op, kind))  # noqa: E731
        self._call("create_commit", repo_id, revision=branch, message=commit_message, oid=oid,
                   added=paths(CommitOperationAdd), deleted=paths(CommitOperationDelete))  # fmt: skip
        return SimpleNamespace(oid=oid, commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}")

    def create_tag(self, repo_id: str, *, tag: str, revision=None, exist_ok=False, **kwargs) -> None:
        self._call("create_tag", repo_id, tag=tag, revision=revision)
        self._authorised()
        repo = self.hub.repo(repo_id)
        if tag in repo["tags"] and not exist_ok:
            raise _error(HfHubHTTPError, 409, f"409 tag {tag} exists")
        repo["tags"][tag] = self.hub.resolve(repo_id, revision)
        self.hub._write_ref(repo_id, tag, repo["tags"][tag])

    def delete_tag(self, repo_id: str, *, tag: str, **kwargs) -> None:
        self._call("delete_tag", repo_id, tag=tag)
        self._authorised()
        self.hub.repo(repo_id)["tags"].pop(tag)
        self.hub._write_ref(repo_id, tag, None)

    def snapshot_download(self, repo_id: str, *, revision=None, allow_patterns=None, **kwargs) -> str:
        self._call("snapshot_download", repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(self.hub.snapshot(repo_id, revision))
