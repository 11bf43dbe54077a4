"""A recording stand-in for the Hugging Face Hub: `FakeHub.api` replaces `huggingface_hub.HfApi` where pm_hf makes
its client (`pm_hf.hub.repository.HfApi`). It keeps every created repository, commit (with its files' bytes), branch
and tag, and every call, and writes each commit into the Hugging Face cache in the standard layout (refs per branch and
tag), so that offline `from_pretrained(repo_id, revision="task-2")` — transformers, PEFT's AutoPeft classes — loads
what was pushed, through the real loading code.

It answers as the real client does: 401 for a token the Hub does not know, 403 for writing with a read-only token
or to a namespace the token cannot write, 404 (`RepositoryNotFoundError`) for a repository it cannot see, 409 for
creating what exists, 412 for a commit whose `parent_commit` is not its branch's head (the Hub lands one commit at a
time); `auth_check(write=True)` answers 403 where the token cannot write an existing repository;
`create_repo(exist_ok=True)` turns a 401/403 on an existing, visible repository into success (as `HfApi.create_repo`
does, through `repo_info`); `whoami` tells the token's role (`auth.accessToken.role`: 'write', 'read' or
'fineGrained' with scoped permissions). Every method (and the constructor) binds its arguments to the installed
`HfApi`'s signature first: an argument the real method does not take is a `TypeError` here too."""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import GitRefInfo, GitRefs, ModelInfo, RepoUrl

GOOD_TOKEN = "hf_standin_token_0123456789"  # the user's token with the 'write' role
READ_TOKEN = "hf_standin_read_token_0123456789"  # the user's token with the 'read' role


def _error(cls, status: int, message: str):
    request = httpx2.Request("GET", "https://huggingface.co/api")
    return cls(message, response=httpx2.Response(status, request=request))


def _as_real(method):
    """Bind every call to the installed `HfApi` method of the same name first (a drifted stand-in fails here)."""
    real = inspect.signature(getattr(HfApi, method.__name__))

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        real.bind(self, *args, **kwargs)  # TypeError: an argument the real method does not take
        return method(self, *args, **kwargs)

    return checked


class FakeHub:
    """The whole stand-in Hub: `repos[repo_id]` = {"private", "branches": {name: oid}, "tags": {name: oid},
    "commits": {oid: {"files": {path: bytes}, "message", "parent", "branch"}}}; `calls`: (method, repo_id, details).
    `tokens` get the 'write' role and `read_tokens` the 'read' role, both of `user`, a member of `orgs` (names, with
    write access, or {name: role in the org}: 'read' for read access only, 'contributor' to create repositories
    there and write only those); `fine_grained` maps a token to
    {namespace or repo_id: [permissions]} (e.g. {"me": ["repo.content.read", "repo.write"]})."""

    def __init__(self, user: str = "me", tokens=(GOOD_TOKEN,), cache_dir: str | Path | None = None, *,
                 read_tokens=(READ_TOKEN,), fine_grained: dict | None = None, orgs=()):  # fmt: skip
        self.user = user
        self.orgs = dict(orgs) if isinstance(orgs, dict) else dict.fromkeys(orgs, "write")
        self.tokens: dict[str, dict] = {t: {"role": "write"} for t in tokens}
        self.tokens.update({t: {"role": "read"} for t in read_tokens})
        for token, grants in (fine_grained or {}).items():
            scoped = [{"entity": {"type": self._entity_type(name), "name": name}, "permissions": list(perms)}
                      for name, perms in grants.items()]  # fmt: skip
            self.tokens[token] = {"role": "fineGrained", "fineGrained": {"global": [], "scoped": scoped}}
        self.cache = Path(cache_dir or constants.HF_HUB_CACHE)
        self.repos: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.clients: list[RecordingApi] = []
        self.lock = threading.Lock()

    def api(self, *args, **kwargs) -> RecordingApi:
        """Stands in for `HfApi(token=...)`."""
        bound = inspect.signature(HfApi.__init__).bind(None, *args, **kwargs)  # TypeError as the real constructor
        client = RecordingApi(self, bound.arguments.get("token"))
        self.clients.append(client)
        return client

    def add_repo(self, repo_id: str, private: bool = False) -> dict:
        """A repository that exists before the test (e.g. another user's)."""
        return self.repos.setdefault(repo_id, {"private": bool(private), "branches": {"main": None}, "tags": {},
                                               "commits": {}})  # fmt: skip

    # ------------------------------------------------------------------------------------- who may do what
    def _entity_type(self, name: str) -> str:
        return "model" if "/" in name else "user" if name == self.user else "org"

    def _namespaces(self, write: bool = False) -> list[str]:
        return [self.user, *(o for o, role in self.orgs.items() if not write or role != "read")]

    def can_read(self, record: dict | None, repo_id: str) -> bool:
        repo = self.repos.get(repo_id)
        return repo is not None and (not repo["private"] or record is not None and
                                     repo_id.split("/")[0] in self._namespaces())  # fmt: skip

    def can_write(self, record: dict | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        if record is None or record["role"] == "read":
            return False
        if record["role"] == "write":
            repo = self.repos.get(repo_id)
            if self.orgs.get(namespace) == "contributor" and repo is not None and repo.get("creator") != self.user:
                return False  # an org's contributor creates repositories there, and writes only those
            return namespace in self._namespaces(write=True)
        return any(s["entity"]["name"] in (namespace, repo_id) and "repo.write" in s["permissions"]
                   for s in record["fineGrained"]["scoped"])  # fmt: skip

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

    def _record(self, required: bool = False) -> dict | None:
        """The token's record (None: anonymous); 401 for a token the Hub does not know, or none where one is needed."""
        if self.token is None and not required:
            return None
        if self.token not in self.hub.tokens:
            raise _error(HfHubHTTPError, 401, "401 Unauthorized: Invalid user token.")
        return self.hub.tokens[self.token]

    def _visible(self, repo_id: str, record: dict | None) -> dict:
        if not self.hub.can_read(record, repo_id):
            raise _error(RepositoryNotFoundError, 404, f"404 Repository Not Found for url: .../{repo_id}")
        return self.hub.repos[repo_id]

    def _writable(self, repo_id: str) -> dict:
        """The repository, for a write: 401 without a valid token, 404 if unseen, 403 if the token cannot write it."""
        record = self._record(required=True)
        repo = self._visible(repo_id, record)
        if not self.hub.can_write(record, repo_id):
            raise _error(HfHubHTTPError, 403, f"403 Forbidden: you don't have the rights to write to {repo_id}")
        return repo

    @_as_real
    def whoami(self, token=None, *, cache=False) -> dict:
        self._call("whoami")
        token = self.token if token is None else token
        if token not in self.hub.tokens:
            raise _error(HfHubHTTPError, 401, "401 Unauthorized: Invalid user token.")
        orgs = [{"type": "org", "name": o, "roleInOrg": role} for o, role in self.hub.orgs.items()]
        access = {"displayName": "stand-in", **self.hub.tokens[token]}
        return {"type": "user", "name": self.hub.user, "orgs": orgs, "auth": {"type": "access_token",
                                                                              "accessToken": access}}  # fmt: skip

    @_as_real
    def repo_info(self, repo_id: str, *, revision=None, **kwargs) -> ModelInfo:
        self._call("repo_info", repo_id, revision=revision)
        repo = self._visible(repo_id, self._record())
        return ModelInfo(id=repo_id, private=repo["private"], sha=self.hub.resolve(repo_id, revision))

    @_as_real
    def create_repo(self, repo_id: str, *, private=None, exist_ok=False, **kwargs) -> RepoUrl:
        self._call("create_repo", repo_id, private=private, exist_ok=exist_ok)
        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        try:  # the Hub's answer to POST /api/repos/create
            record = self._record(required=True)
            if not self.hub.can_write(record, repo_id):
                raise _error(HfHubHTTPError, 403, f"403 Forbidden: you don't have the rights to create {repo_id}")
            if repo_id in self.hub.repos:
                raise _error(HfHubHTTPError, 409, f"409 Conflict: You already created this model repo: {repo_id}")
        except HfHubHTTPError as err:  # what HfApi.create_repo makes of it
            status = err.response.status_code
            if exist_ok and status == 409:
                return url
            if exist_ok and status in (401, 402, 403):  # the repository may exist: asked with repo_info
                try:
                    self.repo_info(repo_id, token=kwargs.get("token"))
                    return url
                except HfHubHTTPError:
                    raise err from None
            raise
        self.hub.add_repo(repo_id, private)["creator"] = self.hub.user
        return url

    @_as_real
    def auth_check(self, repo_id: str, *, repo_type=None, token=None, write=False) -> None:
        """GET /api/models/{repo_id}/auth-check[/write]: 404 for a repository the token cannot see (a
        `RepositoryNotFoundError`), 403 for one it cannot write, 401 for a token the Hub does not know."""
        self._call("auth_check", repo_id, write=write)
        record = self._record()
        self._visible(repo_id, record)
        if write and not self.hub.can_write(record, repo_id):
            raise _error(HfHubHTTPError, 403, f"403 Forbidden: you don't have write access to {repo_id}")

    @_as_real
    def create_branch(self, repo_id: str, *, branch: str, revision=None, exist_ok=False, **kwargs) -> None:
        self._call("create_branch", repo_id, branch=branch)
        repo = self._writable(repo_id)
        if branch in repo["branches"]:
            if not exist_ok:
                raise _error(HfHubHTTPError, 409, f"409 branch {branch} exists")
            return
        repo["branches"][branch] = self.hub.resolve(repo_id, revision)
        self.hub._write_ref(repo_id, branch, repo["branches"][branch])

    @_as_real
    def list_repo_files(self, repo_id: str, *, revision=None, **kwargs) -> list[str]:
        self._call("list_repo_files", repo_id, revision=revision)
        self._visible(repo_id, self._record())
        return sorted(self.hub.files(repo_id, revision))

    @_as_real
    def list_repo_refs(self, repo_id: str, **kwargs) -> GitRefs:
        self._call("list_repo_refs", repo_id)
        repo = self._visible(repo_id, self._record())
        refs = lambda kind, prefix: [  # noqa: E731
            GitRefInfo(name=n, ref=f"refs/{prefix}/{n}", target_commit=o or "") for n, o in repo[kind].items()
        ]
        return GitRefs(branches=refs("branches", "heads"), converts=[], tags=refs("tags", "tags"))

    @_as_real
    def create_commit(self, repo_id: str, operations, *, commit_message: str, revision=None, parent_commit=None,
                      **kwargs):  # fmt: skip
        if parent_commit is not None and not re.fullmatch(r"[0-9a-f]{40}", parent_commit):
            raise ValueError("`parent_commit` is not a valid commit OID.")
        with self.hub.lock:  # the Hub lands one commit per branch at a time
            return self._land(repo_id, list(operations), commit_message, revision or "main", parent_commit)

    def _land(self, repo_id: str, operations: list, commit_message: str, branch: str, parent_commit: str | None):
        repo = self._writable(repo_id)
        if branch not in repo["branches"]:
            raise _error(RevisionNotFoundError, 404, f"404 branch {branch} not found")
        parent = repo["branches"][branch]
        if parent_commit is not None and parent_commit != parent:  # the Hub's precondition on the branch's head
            raise _error(HfHubHTTPError, 412, f"412 Precondition Failed: {branch} is not at {parent_commit}")
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

    @_as_real
    def create_tag(self, repo_id: str, *, tag: str, revision=None, exist_ok=False, **kwargs) -> None:
        self._call("create_tag", repo_id, tag=tag, revision=revision)
        repo = self._writable(repo_id)
        if tag in repo["tags"] and not exist_ok:
            raise _error(HfHubHTTPError, 409, f"409 tag {tag} exists")
        repo["tags"][tag] = self.hub.resolve(repo_id, revision)
        self.hub._write_ref(repo_id, tag, repo["tags"][tag])

    @_as_real
    def delete_tag(self, repo_id: str, *, tag: str, **kwargs) -> None:
        self._call("delete_tag", repo_id, tag=tag)
        self._writable(repo_id)["tags"].pop(tag)
        self.hub._write_ref(repo_id, tag, None)

    @_as_real
    def snapshot_download(self, repo_id: str, *, revision=None, allow_patterns=None, **kwargs) -> str:
        self._call("snapshot_download", repo_id, revision=revision, allow_patterns=allow_patterns)
        self._visible(repo_id, self._record())
        return str(self.hub.snapshot(repo_id, revision))

    @_as_real
    def hf_hub_download(self, repo_id: str, filename: str, *, revision=None, **kwargs) -> str:
        self._call("hf_hub_download", repo_id, filename=filename, revision=revision)
        self._visible(repo_id, self._record())
        if filename not in self.hub.files(repo_id, revision):
            raise _error(RemoteEntryNotFoundError, 404, f"404 Entry Not Found: {filename}")
        return str(self.hub.snapshot(repo_id, revision) / filename)
