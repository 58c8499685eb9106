"""A minimal in-memory Hugging Face Hub served over HTTP on 127.0.0.1, for tests.

It implements only what ``huggingface_hub`` and transformers use to create a model repo, commit
files to it and download them again, so that ``push_to_hub`` and ``from_pretrained`` run the real
client against it (point ``HF_ENDPOINT`` at :attr:`FakeHub.endpoint`):

- ``POST /api/repos/create``: creates ``{organization}/{name}`` (409 if it exists).
- ``POST /api/validate-yaml``: a README's front matter must be a YAML mapping (400 otherwise).
- ``POST /api/models/{repo}/preupload/{rev}``: every file is ``"regular"``, so contents travel
  base64-encoded inside the commit and neither LFS nor Xet storage is involved.
- ``POST /api/models/{repo}/commit/{rev}``: the ndjson commit (header, ``file``, ``deletedFile``).
- ``GET /api/models/{repo}[/revision/{rev}]``: model info (id, commit ``sha``, file list), which
  transformers asks for to pin the revision before it downloads.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file with ``ETag`` (its git blob id),
  ``X-Repo-Commit`` and ``Content-Length``.

Misses answer 404 with the ``X-Error-Code`` from which the client raises
``RepositoryNotFoundError``, ``RevisionNotFoundError`` or ``EntryNotFoundError``. Writes require
``Authorization: Bearer <token>``. Any other route answers 501 and is recorded in
:attr:`FakeHub.unhandled`, so a test can assert that the client needed nothing else. The server
runs in a daemon thread and shuts itself down after ``lifetime_s`` even if a test never stops it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

logger = logging.getLogger(__name__)

Response = tuple[int, dict[str, str], bytes]  # status, headers, body

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_CREATE = re.compile(r"^/api/repos/create$")
_VALIDATE_YAML = re.compile(r"^/api/validate-yaml$")
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_MODEL_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob holding ``content`` (what the Hub sends as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An error answer: HTTP ``status`` with the Hub's ``X-Error-Code`` ``code``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}

    def response(self) -> Response:
        status, headers, body = _json(self.status, {"error": str(self)})
        return status, {**headers, **self.headers, "X-Error-Code": self.code, "X-Error-Message": str(self)}, body


@dataclass
class Repo:
    """A model repo: its commits in order, each a commit id and the full file tree after it."""

    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)


class FakeHub:
    """In-memory Hub on ``127.0.0.1:<free port>``; use as a context manager.

    ``token`` is the only accepted write token. ``repos`` maps ``"org/name"`` to :class:`Repo`;
    ``requests`` lists every ``(method, path)`` served, ``unhandled`` those no route matched.
    """

    def __init__(self, token: str, lifetime_s: float = 120.0):
        self.token = token
        self.lifetime_s = lifetime_s
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._deadline = threading.Timer(lifetime_s, self._expire)
        self._deadline.daemon = True

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._deadline.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._deadline.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def _expire(self) -> None:
        logger.warning("fake Hub at %s stopping after its %.0f s lifetime", self.endpoint, self.lifetime_s)
        self._server.shutdown()

    def revision(self, repo_id: str, revision: str = "main") -> tuple[str, dict[str, bytes]]:
        """(commit id, files) of ``repo_id`` at ``revision`` (``main`` or a commit id); HubError if absent."""
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        for oid, tree in reversed(repo.commits):
            if revision in ("main", oid):
                return oid, tree
        raise HubError(404, "RevisionNotFound", f"Revision {revision!r} not found in {repo_id}")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``: path in the repo -> content."""
        return self.revision(repo_id, revision)[1]

    # Routes: each returns a Response or raises HubError.

    def create_repo(self, body: dict) -> Response:
        if body.get("type", "model") != "model":
            raise HubError(400, "BadRequest", f"only model repos are served, not type={body.get('type')!r}")
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo_id in self.repos:
            raise HubError(409, "RepoExists", f"You already created this model repo: {repo_id}")
        self.repos[repo_id] = Repo()
        return _json(200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, body: dict) -> Response:
        """The Hub's check of a model card's metadata block (``---`` YAML ``---`` at the top)."""
        lines = body["content"].splitlines()
        if not lines or lines[0] != "---" or "---" not in lines[1:]:
            return _json(200, {"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        try:
            metadata = yaml.safe_load("\n".join(lines[1 : lines.index("---", 1)]))
        except yaml.YAMLError as err:
            return _json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if not isinstance(metadata, dict):
            return _json(400, {"errors": [{"message": f"metadata must be a mapping, got {type(metadata).__name__}"}]})
        return _json(200, {"warnings": []})

    def preupload(self, repo_id: str, body: dict) -> Response:
        if repo_id not in self.repos:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in body["files"]]
        return _json(200, {"files": files, "commitOid": None})

    def commit(self, repo_id: str, revision: str, ndjson: bytes) -> Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        if revision != "main":
            raise HubError(404, "RevisionNotFound", f"only commits to main are served, not {revision!r}")
        parent, tree = repo.commits[-1] if repo.commits else ("", {})
        tree, summary = dict(tree), ""
        for line in filter(bytes.strip, ndjson.splitlines()):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file" and value.get("encoding") == "base64":
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            else:
                raise HubError(422, "BadRequest", f"unsupported commit operation {key!r}: preupload said 'regular'")
        blobs = sorted((path, git_blob_id(content)) for path, content in tree.items())
        oid = hashlib.sha1(json.dumps([parent, summary, blobs]).encode()).hexdigest()
        repo.commits.append((oid, tree))
        return _json(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})

    def model_info(self, repo_id: str, revision: str) -> Response:
        oid, tree = self.revision(repo_id, revision)
        siblings = [{"rfilename": path} for path in sorted(tree)]
        return _json(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": False, "siblings": siblings})

    def resolve(self, repo_id: str, revision: str, path: str) -> Response:
        oid, tree = self.revision(repo_id, revision)
        if path not in tree:
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {oid}", {"X-Repo-Commit": oid})
        content = tree[path]
        headers = {"ETag": f'"{git_blob_id(content)}"', "X-Repo-Commit": oid, "Content-Type": "application/octet-stream"}
        return 200, headers, content

    def dispatch(self, method: str, path: str, authorization: str | None, body: bytes) -> Response:
        """Route one request (``path`` without query, percent-decoded)."""
        if method == "POST" and authorization != f"Bearer {self.token}":
            raise HubError(401, "Unauthorized", "Invalid credentials in Authorization header")
        if method == "POST" and _CREATE.match(path):
            return self.create_repo(json.loads(body))
        if method == "POST" and _VALIDATE_YAML.match(path):
            return self.validate_yaml(json.loads(body))
        if method == "POST" and (m := _PREUPLOAD.match(path)):
            return self.preupload(m["repo"], json.loads(body))
        if method == "POST" and (m := _COMMIT.match(path)):
            return self.commit(m["repo"], m["rev"], body)
        if method == "GET" and (m := _MODEL_INFO.match(path)):
            return self.model_info(m["repo"], m["rev"] or "main")
        if method in ("HEAD", "GET") and (m := _RESOLVE.match(path)):
            return self.resolve(m["repo"], m["rev"], m["path"])
        self.unhandled.append((method, path))
        raise HubError(501, "NotImplemented", f"the fake Hub does not serve {method} {path}")


def _json(status: int, payload: dict) -> Response:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, fmt: str, *args) -> None:
            logger.debug("fake Hub: " + fmt, *args)

        def _serve(self, method: str) -> None:
            path = unquote(urlsplit(self.path).path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with hub._lock:
                hub.requests.append((method, path))
                try:
                    status, headers, content = hub.dispatch(method, path, self.headers.get("Authorization"), body)
                except HubError as err:
                    status, headers, content = err.response()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))  # for HEAD: what a GET would send
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(content)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("HEAD")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler
