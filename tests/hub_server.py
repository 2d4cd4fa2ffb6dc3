"""A test double of the Hugging Face Hub's HTTP API, served on 127.0.0.1 for tests.

This is NOT the Hub: it is a small in-memory server that speaks just enough of the Hub's HTTP protocol for the real
`huggingface_hub` client (and `transformers` / `peft` through it) to pull and push model repos in tests, with no
network. Repos hold commits (a sha, a parent and the full file map of the repo at that commit) and branches pointing at
commit shas. Every file is a regular git blob (`uploadMode: "regular"`), so no LFS or Xet is involved.

Routes (model repos, ids `namespace/name`):
    GET  /api/models/{repo}[/revision/{rev}]        repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]     file listing (`?recursive=true`)
    POST /api/models/{repo}/paths-info/{rev}        info on some paths
    GET  /api/models/{repo}/refs                    branches
    HEAD|GET /{repo}/resolve/{rev}/{path}           file content; `X-Repo-Commit`, quoted `ETag`, `Content-Length`
    POST /api/repos/create                          409 (body still has `url`) when the repo exists
    POST /api/validate-yaml                         always valid
    POST /api/models/{repo}/preupload/{rev}         `uploadMode: "regular"` for every file
    POST /api/models/{repo}/commit/{rev}            ndjson: `header`, `file` (base64), `deletedFile`, `deletedFolder`
    POST /api/models/{repo}/branch/{branch}         create a branch (from `startingPoint` or main)
    GET  /api/agent-harnesses                       404 (asked once per process by the client)
Errors are 404s with `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`, as the Hub sends them.

Every request is recorded (`HubServer.requests`: method, path, query, headers) so tests can check what the client
sent, e.g. the `Authorization` header. Use it through the `hub_server` fixture (which also isolates `HF_HOME` and points
the client's default endpoint at the server) or as a context manager.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("GET", re.compile(r"/api/agent-harnesses"), "agent_harnesses"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(rf"/api/models/{_REPO}"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    ("POST", re.compile(rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/refs"), "refs"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)"), "create_branch"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]
_DATE = "2026-01-01T00:00:00.000Z"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as `oid` and `ETag` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    parent: str | None
    message: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class HubServer:
    """In-memory Hub test double on `127.0.0.1:<free port>`, served from a background thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.unhandled: list[str] = []  # "METHOD /path" of requests no route matched
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # the client keeps connections alive: do not wait for them on close
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="hub-test-double", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- direct access for tests (no HTTP) ------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self._lock:
            if repo_id not in self.repos:
                repo = Repo(repo_id, private=private)
                self.repos[repo_id] = repo
                # The Hub starts every repo with a commit holding `.gitattributes`.
                gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                self._commit(repo, "main", {".gitattributes": gitattributes}, [], "initial commit")
            return self.repos[repo_id]

    def commit_files(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "update"
    ) -> str:
        """Commit `files` (path -> content) to `branch` of `repo_id` (created if needed); returns the commit sha."""
        repo = self.create_repo(repo_id)
        with self._lock:
            return self._commit(repo, branch, files, [], message)

    def headers_received(self, name: str) -> list[str]:
        """Values of header `name` over all recorded requests."""
        return [r.headers[name.lower()] for r in self.requests if name.lower() in r.headers]

    def _commit(self, repo: Repo, branch: str, added: dict[str, bytes], deleted: list[str], message: str) -> str:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            for name in [n for n in files if n == path or n.startswith(prefix)]:
                del files[name]
        files.update(added)
        seed = f"{repo.repo_id}\n{parent}\n{message}\n{next(self._counter)}\n" + "\n".join(
            f"{p}:{git_blob_sha(c)}" for p, c in sorted(files.items())
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, files, parent, message)
        repo.branches[branch] = oid
        return oid

    # -- protocol -------------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str, headers: dict[str, str]) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and "authorization" not in headers):
            raise HubError(404 if repo is None else 401, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, rev: str) -> Commit:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev in repo.commits:
            return repo.commits[rev]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _entry(self, path: str, content: bytes) -> dict:
        return {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": path}

    def handle(self, name: str, method: str, params: dict, query: dict, headers: dict, body: bytes):
        """Returns (status, headers, body bytes or JSON-able object)."""
        with self._lock:
            return getattr(self, f"_h_{name}")(method=method, query=query, headers=headers, body=body, **params)

    def _h_agent_harnesses(self, **_):
        raise HubError(404, "Not available on the Hub test double")

    def _h_validate_yaml(self, **_):
        return 200, {}, {"errors": [], "warnings": []}

    def _h_create_repo(self, headers, body, **_):
        payload = json.loads(body or b"{}")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, f"Only model repos are supported by the Hub test double, got {payload.get('type')}")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if "/" not in repo_id:
            repo_id = f"test-user/{repo_id}"  # the Hub puts a bare name in the caller's namespace
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            error = "You already created this model repo"
            raise HubError(409, error, body={"error": error, "url": url})
        self.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def _h_repo_info(self, repo, headers, rev="main", **_):
        r = self._repo(repo, headers)
        commit = self._resolve(r, rev)
        siblings = [
            {"rfilename": p, "size": len(c), "blobId": git_blob_sha(c)} for p, c in sorted(commit.files.items())
        ]
        info = {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
                "private": r.private, "gated": False, "disabled": False, "lastModified": _DATE, "createdAt": _DATE,
                "tags": [], "downloads": 0, "likes": 0, "siblings": siblings}
        return 200, {}, info

    def _h_tree(self, repo, rev, headers, query, path=None, **_):
        commit = self._resolve(self._repo(repo, headers), rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = unquote(path).strip("/") + "/" if path else ""
        entries, folders = [], set()
        for name, content in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entries.append(self._entry(name, content))
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        tree = [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ]
        return 200, {}, tree + entries

    def _h_paths_info(self, repo, rev, headers, body, **_):
        commit = self._resolve(self._repo(repo, headers), rev)
        try:
            paths = json.loads(body)["paths"]
        except (ValueError, KeyError):
            paths = parse_qs(body.decode()).get("paths", [])
        return 200, {}, [self._entry(p, commit.files[p]) for p in paths if p in commit.files]

    def _h_refs(self, repo, headers, **_):
        r = self._repo(repo, headers)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(r.branches.items())]
        return 200, {}, {"branches": branches, "tags": [], "converts": []}

    def _h_create_branch(self, repo, rev, headers, body, **_):
        r = self._repo(repo, headers)
        branch = unquote(rev)
        if branch in r.branches:
            raise HubError(409, f"Reference refs/heads/{branch} already exists")
        start = json.loads(body or b"{}").get("startingPoint", "main")
        r.branches[branch] = self._resolve(r, start).oid
        return 200, {}, {}

    def _h_preupload(self, repo, rev, headers, body, **_):
        commit = self._resolve(self._repo(repo, headers), rev)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha(commit.files[f["path"]]) if f["path"] in commit.files else None}
            for f in json.loads(body)["files"]
        ]
        return 200, {}, {"files": files, "commitOid": commit.oid}

    def _h_commit(self, repo, rev, headers, query, body, **_):
        r = self._repo(repo, headers)
        branch = unquote(rev)
        if query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the Hub test double")
        if branch not in r.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        added, deleted, message = {}, [], ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != r.branches[branch]:
                    raise HubError(412, f"Parent commit {parent} is not the head of {branch}")
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubError(400, f"Commit operation {key!r} is not supported by the Hub test double")
        oid = self._commit(r, branch, added, deleted, message)
        url = f"{self.url}/{repo}/commit/{oid}"
        return 200, {}, {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}

    def _h_resolve(self, repo, rev, path, method, headers, **_):
        commit = self._resolve(self._repo(repo, headers), rev)
        path = unquote(path)
        if path not in commit.files:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound", body={"error": f"Entry {path} not found"})
        content = commit.files[path]
        out = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha(content)}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        status, match = 200, re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("range", ""))
        if match:
            start, end = int(match[1]), int(match[2]) if match[2] else len(content) - 1
            out["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            status, content = 206, content[start:end + 1]
        return status, out, content


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        query = parse_qs(split.query)
        body = self._read_body() if self.command in ("POST", "PUT") else b""
        self.hub.requests.append(RecordedRequest(self.command, split.path, query, headers))
        try:
            for method, pattern, name in _ROUTES:
                if method == self.command and (m := pattern.fullmatch(split.path)):
                    params = {k: v for k, v in m.groupdict().items() if v is not None}
                    status, out_headers, payload = self.hub.handle(name, self.command, params, query, headers, body)
                    break
            else:
                self.hub.unhandled.append(f"{self.command} {split.path}")
                raise HubError(404, f"{self.command} {split.path} is not implemented by the Hub test double")
        except HubError as e:
            status, payload = e.status, e.body or {"error": e.message}
            out_headers = {"X-Error-Message": e.message}
            if e.code:
                out_headers["X-Error-Code"] = e.code
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for key, value in out_headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


def isolate_client(monkeypatch: pytest.MonkeyPatch, hf_home: Path, endpoint: str) -> None:
    """Point huggingface_hub (and transformers) at `endpoint` with an empty `hf_home`, in this process and children.

    huggingface_hub reads `HF_ENDPOINT`/`HF_HOME` once, at import: the env vars serve subprocesses, the patched
    constants serve this process, so that a call without `endpoint=` reaches the test double, never huggingface.co.
    """
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    try:
        import transformers.utils.hub as transformers_hub
    except ImportError:
        return
    monkeypatch.setattr(transformers_hub, "_hf_api", None)  # its shared HfApi caches the endpoint it was built with


@pytest.fixture(name="hub_server")
def hub_server_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running `HubServer`; `HF_HOME` is `tmp_path / "hf_home"` and the client's default endpoint is the server.

    Import it into a test module (`from tests.hub_server import hub_server_fixture`) to use the `hub_server` fixture.
    """
    with HubServer() as server:
        isolate_client(monkeypatch, tmp_path / "hf_home", server.url)
        yield server
