"""A small Hugging Face Hub-compatible HTTP server for tests.

Why: pushing to / pulling from the Hub must be tested with the *real* ``huggingface_hub`` client (and with
``transformers``' ``push_to_hub`` / ``from_pretrained``), without network access and without mocking the client.
This module implements the subset of the Hub HTTP API those clients use, keeping repositories in memory:

* repos: ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml``, ``GET /api/{models,datasets,spaces}[/{repo_id}[/revision/{rev}]]``,
  ``GET .../tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``, ``GET .../refs``, ``GET .../commits/{rev}``,
  ``POST|DELETE .../branch/{name}``;
* uploads: ``POST .../preupload/{rev}`` (decides "regular" vs "lfs"), the git-LFS batch API
  ``POST /{repo_id}.git/info/lfs/objects/batch`` with single-part (and optional multi-part) PUT uploads and
  verify, and ``POST .../commit/{rev}`` (ndjson, incl. ``create_pr``);
* downloads: ``GET|HEAD /{repo_id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``,
  ``X-Linked-Size`` and ``Range`` support.

Xet is *not* implemented: clients must run with ``HF_HUB_DISABLE_XET=1`` (``hf_xet`` is installed in the venv and
would otherwise be used for every LFS upload). ``huggingface_hub`` reads ``HF_ENDPOINT`` when it is imported, so a
client must either be started in a subprocess with :meth:`HubServer.client_env`, or be re-pointed in-process with
:func:`hub_fixtures.point_hf_clients_at` (what the ``hub`` fixture does). Bugs or unsupported
features of this server answer HTTP 501 (logged), which the client does not retry, so a test fails fast.

Usage (see ``tests/helpers/hub_fixtures.py`` for the pytest fixtures)::

    with HubServer() as server:
        env = server.client_env(tmp_path / "hf_home")
        subprocess.run([sys.executable, "-c", "..."], env=env, check=True)
        assert server.repo("user/tiny").files()["config.json"] == expected_bytes
        server.fail_next("/commit/", 500)  # the next commit request answers HTTP 500
        assert server.tokens_seen == {DEFAULT_TOKEN}  # the token the client sent
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_USER = "user"
DEFAULT_TOKEN = "hf_testtoken_0123456789abcdef"
DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Files at least this big must go through LFS (the Hub rejects regular git blobs above 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# The `.gitattributes` every new Hub repo starts with; its patterns also decide which files are LFS.
_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
    "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
    "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents* *.gguf"
).split()
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS).encode()
_JSON = "application/json"
_LFS_JSON = "application/vnd.git-lfs+json"


def git_blob_sha1(content: bytes) -> str:
    """Git object id of a blob: what the Hub reports as ``blob_id`` / ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file committed in place of a large file (its sha1 is the file's ``blob_id``)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit. Content is kept even for LFS files so tests can read it back directly."""

    path: str
    content: bytes
    lfs_sha256: str | None = None  # set when the file was committed through LFS

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def blob_id(self) -> str:
        if self.lfs_sha256 is not None:
            return git_blob_sha1(lfs_pointer(self.lfs_sha256, self.size))
        return git_blob_sha1(self.content)

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.blob_id

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs_sha256 is not None:
            pointer = lfs_pointer(self.lfs_sha256, self.size)
            entry["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: datetime
    files: dict[str, StoredFile]
    author: str = DEFAULT_USER


@dataclass
class Repo:
    """In-memory git-like repository: commits are full snapshots, branches point at commits."""

    repo_type: str
    repo_id: str
    private: bool = False
    created_at: datetime = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # also holds "refs/pr/N"
    tags: dict[str, str] = field(default_factory=dict)
    num_prs: int = 0

    @property
    def url_path(self) -> str:
        return _URL_PREFIXES[self.repo_type] + self.repo_id

    def resolve(self, revision: str | None = None) -> Commit | None:
        """Commit for a branch, tag, PR ref or full commit oid; ``None`` if unknown."""
        rev = revision or DEFAULT_BRANCH
        oid = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(oid) if oid else None

    def head(self, revision: str | None = None) -> str:
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"unknown revision {revision!r} in {self.repo_id}")
        return commit.oid

    def files(self, revision: str | None = None) -> dict[str, bytes]:
        """``{path: content}`` of the repo at ``revision`` (default: main)."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"unknown revision {revision!r} in {self.repo_id}")
        return {path: f.content for path, f in commit.files.items()}

    def lfs_files(self, revision: str | None = None) -> set[str]:
        """Paths that were committed through LFS."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"unknown revision {revision!r} in {self.repo_id}")
        return {path for path, f in commit.files.items() if f.lfs_sha256 is not None}

    def log(self, revision: str | None = None) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        commit, out = self.resolve(revision), []
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out

    def add_commit(
        self, branch: str, files: dict[str, StoredFile], title: str, message: str = "", parent: str | None = None
    ) -> Commit:
        seed = json.dumps([self.repo_id, parent, sorted((p, f.etag) for p, f in files.items()), title, message])
        oid = hashlib.sha1((seed + secrets.token_hex(8)).encode()).hexdigest()
        commit = Commit(oid=oid, parent=parent, title=title, message=message, date=_now(), files=dict(files))
        self.commits[oid] = commit
        self.branches[branch] = oid
        return commit


@dataclass
class RecordedRequest:
    """What the server saw for one request (bodies are not kept: LFS uploads can be large)."""

    method: str
    path: str
    headers: dict[str, str]
    body_size: int
    status: int | None = None

    @property
    def authorization(self) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == "authorization"), None)


@dataclass
class _FailureRule:
    substring: str
    status: int
    method: str | None
    remaining: int
    message: str


class HubError(Exception):
    """Raised inside handlers to answer with a Hub-style error (status, ``X-Error-Code``, JSON ``error``)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers = headers or {}
        self.extra = extra or {}  # additional JSON body fields


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return _iso(obj)
    raise TypeError(f"not JSON serializable: {type(obj)}")


def _parse_front_matter(readme: bytes) -> dict | None:
    """YAML metadata block of a README, exposed as ``cardData`` like the Hub does (best effort)."""
    match = re.match(rb"^---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.DOTALL)
    if not match:
        return None
    try:
        import yaml  # optional: transformers depends on PyYAML

        data = yaml.safe_load(match.group(1).decode("utf-8"))
    except Exception:  # noqa: BLE001 - metadata is informational only
        return None
    return data if isinstance(data, dict) else None


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1 (random port), running in a background thread.

    Args:
        user: namespace used for repo ids without one and returned by ``whoami``.
        accepted_tokens: if given, write requests must carry ``Authorization: Bearer <one of them>`` and private
            repos are only readable with one; any other bearer token is answered 401. ``None`` accepts anything.
        lfs_multipart_chunk_size: if set, LFS objects larger than this are uploaded with the multi-part protocol.
        init_gitattributes: start new repos with an initial ``.gitattributes`` commit, like the real Hub.
    """

    def __init__(
        self,
        *,
        user: str = DEFAULT_USER,
        accepted_tokens: Collection[str] | None = None,
        lfs_multipart_chunk_size: int | None = None,
        init_gitattributes: bool = True,
    ) -> None:
        self.user = user
        self.accepted_tokens = set(accepted_tokens) if accepted_tokens is not None else None
        self.lfs_multipart_chunk_size = lfs_multipart_chunk_size
        self.init_gitattributes = init_gitattributes
        self.repos: dict[str, Repo] = {}  # key: URL path, i.e. "user/x", "datasets/user/x", "spaces/user/x"
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content (uploaded, not necessarily committed)
        self.requests: list[RecordedRequest] = []
        self._lfs_parts: dict[str, dict[int, bytes]] = {}
        self._failures: list[_FailureRule] = []
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        handler = type("BoundHubHandler", (_HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        logger.info("Hub test server listening on %s", self.endpoint)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        with self._lock:  # drop idle keep-alive connections so their handler threads end now
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """Value for ``HF_ENDPOINT`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    def client_env(
        self, hf_home: str | os.PathLike, token: str | None = DEFAULT_TOKEN, base: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for a subprocess running ``huggingface_hub`` / ``transformers`` against this server."""
        env = dict(os.environ if base is None else base)
        for key in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER", "HF_OIDC_RESOURCE", "HF_TOKEN_PATH"):
            env.pop(key, None)
        hf_home = str(hf_home)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
            HF_HOME=hf_home,
            HF_HUB_CACHE=os.path.join(hf_home, "hub"),
            HF_XET_CACHE=os.path.join(hf_home, "xet"),
            NO_PROXY=",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"])),
        )
        env["no_proxy"] = env["NO_PROXY"]
        if token is None:
            env.pop("HF_TOKEN", None)
        else:
            env["HF_TOKEN"] = token
        return env

    # ------------------------------------------------------------------ test helpers
    def fail_next(
        self, path_substring: str, status: int = 500, *, method: str | None = None, times: int = 1, message: str = ""
    ) -> None:
        """Answer the next ``times`` requests whose path contains ``path_substring`` with HTTP ``status``.

        The commit endpoint (``"/commit/"``) is not retried by the client, so one failure makes ``create_commit``
        raise. Preupload, LFS batch/upload and downloads use ``http_backoff`` and retry 5xx up to 5 times.
        """
        rule = _FailureRule(
            path_substring, status, method.upper() if method else None, times, message or f"Injected {status} error"
        )
        with self._lock:
            self._failures.append(rule)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (``KeyError`` if it was never created)."""
        return self.repos[_URL_PREFIXES[repo_type] + repo_id]

    def repo_files(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> dict[str, bytes]:
        return self.repo(repo_id, repo_type).files(revision)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        """Create a repo directly (e.g. to seed a test), like ``POST /api/repos/create`` would."""
        if "/" not in repo_id:
            repo_id = f"{self.user}/{repo_id}"
        with self._lock:
            key = _URL_PREFIXES[repo_type] + repo_id
            if key in self.repos:
                return self.repos[key]
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            if self.init_gitattributes:
                attrs = StoredFile(".gitattributes", DEFAULT_GITATTRIBUTES)
                repo.add_commit(DEFAULT_BRANCH, {".gitattributes": attrs}, "initial commit")
            else:
                repo.add_commit(DEFAULT_BRANCH, {}, "initial commit")
            self.repos[key] = repo
            return repo

    @property
    def authorization_headers(self) -> list[str]:
        """Every ``Authorization`` header value received, in order."""
        with self._lock:
            return [r.authorization for r in self.requests if r.authorization]

    @property
    def tokens_seen(self) -> set[str]:
        """Bearer tokens received (to check which token a client used, or that none leaked)."""
        return {h.split(" ", 1)[1] if h.lower().startswith("bearer ") else h for h in self.authorization_headers}

    def requests_matching(self, path_substring: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests if path_substring in r.path and (method is None or r.method == method.upper())
            ]

    def iter_stored_bytes(self) -> Iterator[tuple[str, bytes]]:
        """``(label, content)`` for every stored file and LFS object, e.g. to assert a secret was never pushed."""
        with self._lock:
            for key, repo in self.repos.items():
                for commit in repo.commits.values():
                    for path, f in commit.files.items():
                        yield f"{key}@{commit.oid[:8]}:{path}", f.content
                    yield f"{key}@{commit.oid[:8]}:<message>", (commit.title + "\n" + commit.message).encode()
            for oid, content in self.lfs_objects.items():
                yield f"lfs:{oid}", content

    # ------------------------------------------------------------------ request plumbing
    def _take_failure(self, method: str, path: str) -> _FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.substring in path and (rule.method is None or rule.method == method):
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._failures.remove(rule)
                    return rule
        return None

    def _check_token(self, authorization: str | None, *, write: bool) -> bool:
        """Whether the request is authenticated; raises 401 on a wrong token (or a missing one for writes)."""
        if self.accepted_tokens is None:
            return True
        token = authorization[7:] if authorization and authorization.lower().startswith("bearer ") else None
        if token is not None and token not in self.accepted_tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        if token is None and write:
            raise HubError(401, "Invalid username or password.")
        return token is not None

    def _get_repo(self, repo_type: str, repo_id: str, authorization: str | None) -> Repo:
        repo = self.repos.get(_URL_PREFIXES[repo_type] + repo_id)
        authenticated = self._check_token(authorization, write=False)
        if repo is None or (repo.private and not authenticated):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _get_commit(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ API: users / repos
    def whoami(self, authorization: str | None) -> dict:
        if authorization is None:
            raise HubError(401, "Invalid username or password.")
        self._check_token(authorization, write=True)
        return {
            "type": "user",
            "id": "0" * 24,
            "name": self.user,
            "fullname": self.user,
            "email": f"{self.user}@example.com",
            "emailVerified": True,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
        }

    def api_create_repo(self, payload: dict, authorization: str | None) -> dict:
        self._check_token(authorization, write=True)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name = payload.get("name")
        if not name or not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or self.user}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            key = _URL_PREFIXES[repo_type] + repo_id
            if key in self.repos:
                # Like the Hub, answer the conflict with the existing repo's url.
                raise HubError(409, "You already created this model repo", extra={"url": self._repo_url(key)})
            self.create_repo(repo_id, repo_type, private=private)
        return {"url": self._repo_url(key), "name": repo_id, "id": hashlib.sha1(key.encode()).hexdigest()[:24]}

    def _repo_url(self, key: str) -> str:
        return f"{self.endpoint}/{key}"

    def api_delete_repo(self, payload: dict, authorization: str | None) -> dict:
        self._check_token(authorization, write=True)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        with self._lock:
            if self.repos.pop(_URL_PREFIXES.get(repo_type, "") + repo_id, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        return {}

    def repo_info(self, repo: Repo, revision: str | None, blobs: bool) -> dict:
        commit = self._get_commit(repo, revision or DEFAULT_BRANCH)
        siblings = []
        for path in sorted(commit.files):
            f = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.lfs_sha256 is not None:
                    pointer_size = len(lfs_pointer(f.lfs_sha256, f.size))
                    sibling["lfs"] = {"sha256": f.lfs_sha256, "size": f.size, "pointerSize": pointer_size}
            siblings.append(sibling)
        card = _parse_front_matter(commit.files["README.md"].content) if "README.md" in commit.files else None
        tags = list(card.get("tags") or []) if card else []
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.url_path.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
            if card:
                info.update({k: card[k] for k in ("library_name", "pipeline_tag") if k in card})
        elif repo.repo_type == "space":
            info["sdk"] = (card or {}).get("sdk", "static")
        return info

    def list_repos(self, repo_type: str, query: dict[str, list[str]], authorization: str | None) -> list[dict]:
        author = (query.get("author") or [None])[0]
        search = (query.get("search") or [""])[0]
        authenticated = self._check_token(authorization, write=False)
        with self._lock:
            repos = [r for r in self.repos.values() if r.repo_type == repo_type]
        return [
            self.repo_info(r, None, blobs=False)
            for r in repos
            if (not r.private or authenticated)
            and (author is None or r.repo_id.split("/")[0] == author)
            and search in r.repo_id
        ]

    def tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> list[dict]:
        commit = self._get_commit(repo, revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        files: list[dict] = []
        dirs: dict[str, list[str]] = {}
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            parts = rel.split("/")
            for i in range(1, len(parts)):
                dir_path = prefix + "/".join(parts[:i])
                if recursive or i == 1:
                    dirs.setdefault(dir_path, []).append(p)
            if recursive or len(parts) == 1:
                files.append(commit.files[p].tree_entry())
        folders = [
            {"type": "directory", "oid": hashlib.sha1("\n".join(members).encode()).hexdigest(), "size": 0, "path": d}
            for d, members in sorted(dirs.items())
        ]
        return folders + files

    def paths_info(self, repo: Repo, revision: str, paths: list[str]) -> list[dict]:
        commit = self._get_commit(repo, revision)
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                out.append(commit.files[path].tree_entry())
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path})
        return out

    def refs(self, repo: Repo, include_prs: bool) -> dict:
        def ref(name: str, oid: str, kind: str) -> dict:
            full = name if name.startswith("refs/") else f"refs/{kind}/{name}"
            return {"name": name, "ref": full, "targetCommit": oid}

        branches = [ref(n, o, "heads") for n, o in repo.branches.items() if not n.startswith("refs/pr/")]
        out = {"branches": branches, "converts": [], "tags": [ref(n, o, "tags") for n, o in repo.tags.items()]}
        if include_prs:
            out["pullRequests"] = [ref(n, o, "pr") for n, o in repo.branches.items() if n.startswith("refs/pr/")]
        return out

    def commits(self, repo: Repo, revision: str) -> list[dict]:
        self._get_commit(repo, revision)
        return [
            {
                "id": c.oid,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": c.author}],
                "formatted": {"title": c.title, "message": c.message},
            }
            for c in repo.log(revision)
        ]

    def create_branch(self, repo: Repo, branch: str, payload: dict, authorization: str | None) -> dict:
        self._check_token(authorization, write=True)
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._get_commit(repo, payload.get("startingPoint") or DEFAULT_BRANCH).oid
        return {}

    def delete_branch(self, repo: Repo, branch: str, authorization: str | None) -> dict:
        self._check_token(authorization, write=True)
        with self._lock:
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return {}

    # ------------------------------------------------------------------ API: uploads
    @staticmethod
    def upload_mode(path: str, size: int, sample: bytes) -> str:
        """Hub rule of thumb: big, binary, or `.gitattributes`-tracked files go to LFS."""
        if size >= LFS_SIZE_THRESHOLD or b"\x00" in sample:
            return "lfs"
        name = path.rsplit("/", 1)[-1]
        return "lfs" if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in _LFS_PATTERNS) else "regular"

    def preupload(self, repo: Repo, revision: str, payload: dict, authorization: str | None) -> dict:
        self._check_token(authorization, write=True)
        commit = self._get_commit(repo, revision)
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            mode = self.upload_mode(path, size, base64.b64decode(item.get("sample", "")))
            remote = commit.files.get(path)
            # The client skips unchanged files when this oid equals its local one (sha256 for LFS, git sha1 else).
            oid = None
            if remote is not None:
                oid = remote.lfs_sha256 if (mode == "lfs" and remote.lfs_sha256) else remote.blob_id
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": files, "commitOid": commit.oid}

    def lfs_batch(self, repo: Repo, payload: dict, authorization: str | None) -> dict:
        self._check_token(authorization, write=True)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported by the test server")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with self._lock:
                stored = self.lfs_objects.get(oid)
            if stored is None or len(stored) != size:  # no "actions" tells the client the object is already there
                verify = {"href": f"{self.endpoint}/_lfs/verify/{oid}", "header": {}}
                chunk = self.lfs_multipart_chunk_size
                if chunk is not None and size > chunk:
                    n_parts = -(-size // chunk)
                    header = {"chunk_size": str(chunk)}
                    header.update({f"{i:05d}": f"{self.endpoint}/_lfs/part/{oid}/{i}" for i in range(1, n_parts + 1)})
                    upload = {"href": f"{self.endpoint}/_lfs/complete/{oid}", "header": header}
                else:
                    upload = {"href": f"{self.endpoint}/_lfs/upload/{oid}", "header": {}}
                entry["actions"] = {"upload": upload, "verify": verify}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _store_lfs_object(self, oid: str, content: bytes) -> None:
        actual = hashlib.sha256(content).hexdigest()
        if actual != oid:
            raise HubError(400, f"LFS object sha256 mismatch: expected {oid}, got {actual}")
        with self._lock:
            self.lfs_objects[oid] = content

    def lfs_upload_part(self, oid: str, part: int, content: bytes) -> dict[str, str]:
        with self._lock:
            self._lfs_parts.setdefault(oid, {})[part] = content
        return {"ETag": f'"{hashlib.md5(content).hexdigest()}"'}

    def lfs_complete(self, oid: str, payload: dict) -> dict:
        with self._lock:
            parts = self._lfs_parts.pop(oid, {})
        numbers = [p["partNumber"] for p in payload.get("parts", [])]
        if sorted(numbers) != sorted(parts):
            raise HubError(400, f"Multipart completion for {oid} lists parts {numbers}, uploaded {sorted(parts)}")
        self._store_lfs_object(oid, b"".join(parts[i] for i in sorted(parts)))
        return {}

    def lfs_verify(self, oid: str, payload: dict) -> dict:
        with self._lock:
            content = self.lfs_objects.get(oid)
        if content is None or len(content) != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found or has the wrong size")
        return {}

    def commit(
        self, repo: Repo, revision: str, body: bytes, query: dict[str, list[str]], authorization: str | None
    ) -> dict:
        self._check_token(authorization, write=True)
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        create_pr = (query.get("create_pr") or ["0"])[0] in ("1", "true", "True")
        with self._lock:
            base = repo.resolve(revision)
            if base is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if not create_pr and revision not in repo.branches:
                raise HubError(400, f"Cannot commit to {revision!r}: not a branch")
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "").strip("/")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[path] = StoredFile(path, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    content = self.lfs_objects.get(value["oid"])
                    if content is None:
                        raise HubError(422, f"LFS file {path} (oid {value['oid']}) was not uploaded")
                    files[path] = StoredFile(path, content, lfs_sha256=value["oid"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            branch, pr_url = revision, None
            if create_pr:
                repo.num_prs += 1
                branch = f"refs/pr/{repo.num_prs}"
                pr_url = f"{self.endpoint}/{repo.url_path}/discussions/{repo.num_prs}"
            new = repo.add_commit(
                branch, files, header.get("summary", ""), header.get("description", ""), parent=base.oid
            )
        logger.debug("Committed %s to %s@%s", new.oid, repo.url_path, branch)
        return {
            "success": True,
            "commitOid": new.oid,
            "commitUrl": f"{self.endpoint}/{repo.url_path}/commit/{new.oid}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        }

    def validate_yaml(self, payload: dict) -> dict:
        """Reject README metadata that is not valid YAML, as the Hub does before accepting a commit."""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", payload.get("content", ""), flags=re.DOTALL)
        if match:
            try:
                import yaml

                yaml.safe_load(match.group(1))
            except ImportError:
                pass
            except yaml.YAMLError as err:
                return {"errors": [{"message": f"Invalid YAML in README.md metadata: {err}"}], "warnings": []}
        return {"errors": [], "warnings": []}

    # ------------------------------------------------------------------ downloads
    def resolve_file(self, repo: Repo, revision: str, path: str) -> tuple[Commit, StoredFile]:
        commit = self._get_commit(repo, revision)
        f = commit.files.get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        return commit, f


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Parses requests, applies injected failures, routes to :class:`HubServer` methods, writes responses."""

    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the Hub
    server_version = "HubTestServer/1.0"
    timeout = 60

    # ---- plumbing
    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        logger.debug("%s - %s", self.address_string(), format % args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = _JSON,
        headers: dict[str, str] | None = None,
        content_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.send_header("X-Request-Id", secrets.token_hex(8))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self._record.status = status

    def _send_json(self, data: Any, status: int = 200, content_type: str = _JSON) -> None:
        self._send(status, json.dumps(data, default=_json_default).encode(), content_type)

    def _send_error(self, err: HubError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message.replace("\n", " ")
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        body = json.dumps({**err.extra, "error": err.message}).encode()
        self._send(err.status, body, _JSON, headers)

    def _handle(self) -> None:
        body = self._read_body()  # always drain the body: keeps the keep-alive connection usable
        self._record = RecordedRequest(self.command, self.path, dict(self.headers.items()), len(body))
        with self.hub._lock:
            self.hub.requests.append(self._record)
        try:
            rule = self.hub._take_failure(self.command, self.path)
            if rule is not None:
                logger.info("Injecting HTTP %s for %s %s", rule.status, self.command, self.path)
                raise HubError(rule.status, rule.message)
            split = urlsplit(self.path)
            segments = [unquote(s) for s in split.path.strip("/").split("/")] if split.path.strip("/") else []
            self._dispatch(segments, parse_qs(split.query), body)
        except HubError as err:
            self._send_error(err)
        except Exception as err:  # noqa: BLE001 - a server bug must surface as an HTTP error, not a dropped connection
            # 501, not 500: the client retries 5xx (except 501) for ~20 s, which would only slow down a failing test.
            logger.exception("Hub test server error on %s %s", self.command, self.path)
            self._send_error(HubError(501, f"Internal test-server error: {err!r}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815 - names fixed by http.server

    # ---- routing
    def _auth(self) -> str | None:
        return self.headers.get("Authorization")

    def _dispatch(self, seg: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub, method = self.hub, self.command
        if seg[:1] == ["api"]:
            return self._dispatch_api(seg[1:], query, body)
        if seg[:1] == ["_lfs"] and len(seg) >= 3:
            kind, oid = seg[1], seg[2]
            if kind == "upload" and method == "PUT":
                hub._store_lfs_object(oid, body)
                return self._send(200)
            if kind == "part" and method == "PUT" and len(seg) == 4:
                return self._send(200, headers=hub.lfs_upload_part(oid, int(seg[3]), body))
            if kind == "complete" and method == "POST":
                return self._send_json(hub.lfs_complete(oid, json.loads(body or b"{}")), content_type=_LFS_JSON)
            if kind == "verify" and method == "POST":
                return self._send_json(hub.lfs_verify(oid, json.loads(body or b"{}")), content_type=_LFS_JSON)
        repo_type, rest = "model", seg
        if seg[:1] in (["datasets"], ["spaces"]):
            repo_type, rest = _API_TYPES[seg[0]], seg[1:]
        # /{repo}.git/info/lfs/objects/batch
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]:
            repo = hub._get_repo(repo_type, f"{rest[0]}/{rest[1][:-4]}", self._auth())
            return self._send_json(hub.lfs_batch(repo, json.loads(body), self._auth()), content_type=_LFS_JSON)
        # /{repo}/resolve/{revision}/{path}
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            repo = hub._get_repo(repo_type, f"{rest[0]}/{rest[1]}", self._auth())
            return self._serve_file(repo, rest[3], "/".join(rest[4:]))
        raise HubError(404, f"Not found: {method} {self.path}")

    def _dispatch_api(self, seg: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub, method, auth = self.hub, self.command, self._auth()
        if seg == ["whoami-v2"]:
            return self._send_json(hub.whoami(auth))
        if seg == ["repos", "create"] and method == "POST":
            return self._send_json(hub.api_create_repo(json.loads(body), auth))
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._send_json(hub.api_delete_repo(json.loads(body), auth))
        if seg == ["validate-yaml"] and method == "POST":
            result = hub.validate_yaml(json.loads(body))
            return self._send_json(result, status=400 if result["errors"] else 200)
        if seg[:1] == ["telemetry"]:
            return self._send_json({})
        if not seg or seg[0] not in _API_TYPES:
            raise HubError(404, f"Not found: {method} {self.path}")
        repo_type = _API_TYPES[seg[0]]
        if len(seg) == 1 and method == "GET":
            return self._send_json(hub.list_repos(repo_type, query, auth))
        if len(seg) < 3:
            raise HubError(404, f"Not found: {method} {self.path}")
        repo = hub._get_repo(repo_type, f"{seg[1]}/{seg[2]}", auth)
        action, args = (seg[3], seg[4:]) if len(seg) > 3 else (None, [])
        blobs = (query.get("blobs") or ["false"])[0].lower() in ("1", "true")
        if action is None and method == "GET":
            return self._send_json(hub.repo_info(repo, None, blobs))
        if action == "revision" and len(args) == 1 and method == "GET":
            return self._send_json(hub.repo_info(repo, args[0], blobs))
        if action == "tree" and args and method == "GET":
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
            return self._send_json(hub.tree(repo, args[0], "/".join(args[1:]), recursive))
        if action == "paths-info" and len(args) == 1 and method == "POST":
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            if not paths and body.startswith(b"{"):
                paths = json.loads(body).get("paths", [])
            return self._send_json(hub.paths_info(repo, args[0], paths))
        if action == "preupload" and len(args) == 1 and method == "POST":
            return self._send_json(hub.preupload(repo, args[0], json.loads(body), auth))
        if action == "commit" and len(args) == 1 and method == "POST":
            return self._send_json(hub.commit(repo, args[0], body, query, auth))
        if action == "refs" and not args and method == "GET":
            include_prs = (query.get("include_prs") or ["0"])[0] in ("1", "true")
            return self._send_json(hub.refs(repo, include_prs))
        if action == "commits" and len(args) == 1 and method == "GET":
            return self._send_json(hub.commits(repo, args[0]))
        if action == "branch" and len(args) == 1 and method == "POST":
            return self._send_json(hub.create_branch(repo, args[0], json.loads(body or b"{}"), auth))
        if action == "branch" and len(args) == 1 and method == "DELETE":
            return self._send_json(hub.delete_branch(repo, args[0], auth))
        raise HubError(404, f"Not found: {method} {self.path}")

    def _serve_file(self, repo: Repo, revision: str, path: str) -> None:
        commit, f = self.hub.resolve_file(repo, revision, path)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.lfs_sha256 is not None:
            headers.update({"X-Linked-Etag": f'"{f.lfs_sha256}"', "X-Linked-Size": str(f.size)})
        content, status = f.content, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            start_s, end_s = match.groups()
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else f.size - 1
            else:  # suffix range: last N bytes
                start, end = max(f.size - int(end_s), 0), f.size - 1
            if start >= f.size:
                headers["Content-Range"] = f"bytes */{f.size}"
                raise HubError(416, "Requested range not satisfiable", headers=headers)
            end = min(end, f.size - 1)
            content, status = f.content[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        self._send(status, content, "application/octet-stream", headers)


__all__ = [
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "Commit",
    "HubServer",
    "RecordedRequest",
    "Repo",
    "StoredFile",
    "git_blob_sha1",
    "lfs_pointer",
]


def _main() -> None:  # pragma: no cover - manual debugging aid: `python tests/helpers/hub_server.py`
    logging.basicConfig(level=logging.DEBUG)
    with HubServer() as server:
        logger.info("HF_ENDPOINT=%s HF_HUB_DISABLE_XET=1 (Ctrl-C to stop)", server.endpoint)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # pragma: no cover
    _main()
