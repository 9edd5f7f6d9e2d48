"""A fake Hugging Face Hub: the smallest HTTP server that speaks the parts of the Hub's API that
``huggingface_hub`` (2.x) uses to resolve a revision and download files over plain HTTP.

It stands in for https://huggingface.co in tests, so that ``huggingface_hub`` itself does the
download over real HTTP (point it here with ``HF_ENDPOINT=server.url``, or ``endpoint=``):

- ``GET /api/{models,datasets}/{repo}/revision/{rev}``: the repository's info at a revision (what
  ``HfApi.model_info``/``dataset_info``/``repo_info`` read): ``sha`` (the commit) and ``siblings``
  (with ``size``, ``blobId`` and ``lfs`` when ``?blobs=True``);
- ``GET /api/{models,datasets}/{repo}/tree/{rev}``: the file listing ``snapshot_download`` reads;
- ``HEAD``/``GET /[datasets/]{repo}/resolve/{rev}/{path}``: a file, with the headers
  ``hf_hub_download`` needs (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for
  large files, ``Content-Length``, ``Accept-Ranges``) and ``Range: bytes=N-`` answered with 206
  (how ``huggingface_hub`` resumes a cut download). No Xet headers: clients use plain HTTP.
- errors as the Hub sends them (status and ``X-Error-Code``/``X-Error-Message``, which
  ``huggingface_hub`` turns into its typed errors): ``RepoNotFound`` (401), ``RevisionNotFound``
  (404), ``EntryNotFound`` (404), and for a gated repository ``GatedRepo`` (401) without a
  token and ``Invalid credentials in Authorization header`` (401) with a wrong one.

Repositories are built by the test from bytes (``add_repo``); a commit is the hash of the files,
branches and tags name commits. The server counts the body bytes it sent per file
(``bytes_served``), logs every request (``requests``, without headers, so no token), and can cut
the next download of a file after N bytes, once (``cut_once``), to exercise resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

#: Files at least this big are "LFS" files (the Hub answers X-Linked-Etag/Size for them).
LFS_THRESHOLD = 1024


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


@dataclass
class Repo:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    files: dict[str, bytes]
    #: Branch or tag name -> commit; every repository has "main".
    refs: dict[str, str] = field(default_factory=dict)
    #: When set, every request must carry ``Authorization: Bearer <token>`` (a gated repo).
    token: str | None = None
    #: Earlier commits of the repository (commit -> its files), still downloadable by commit.
    history: dict[str, Repo] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()  # a commit id, as git's
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + _git_blob_id(self.files[name]).encode())
        return digest.hexdigest()

    def etag(self, path: str) -> str:
        data = self.files[path]
        if len(data) >= LFS_THRESHOLD:
            return hashlib.sha256(data).hexdigest()  # the LFS object id, as the Hub's ETag
        return _git_blob_id(data)

    def entry(self, path: str) -> dict[str, Any]:
        data = self.files[path]
        info: dict[str, Any] = {"size": len(data), "oid": _git_blob_id(data)}
        if len(data) >= LFS_THRESHOLD:
            info["lfs"] = {"oid": self.etag(path), "size": len(data), "pointerSize": 134}
        return info


@dataclass
class Cut:
    after: int
    done: bool = False


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.bytes_served: Counter[str] = Counter()  # "repo_id/path" -> body bytes sent
        self.requests: list[str] = []  # "METHOD /path [range]"
        self._cuts: dict[str, Cut] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- what tests call ------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        token: str | None = None,
        branch: str = "main",
    ) -> Repo:
        """Publish ``files`` as ``branch`` of ``repo_id`` (replacing what the branch named: a
        new commit; earlier commits of the same repository stay downloadable)."""
        old = self.repos.get((repo_type, repo_id))
        repo = Repo(repo_id, repo_type, dict(files), token=token)
        repo.refs = {**(old.refs if old else {}), branch: repo.commit}
        if old:  # keep serving the old commits' files under their commit ids
            repo.history = {**old.history, old.commit: old}
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def cut_once(self, repo_id: str, path: str, after: int) -> None:
        """The next GET of ``path`` sends ``after`` bytes of the body, then drops the connection."""
        self._cuts[f"{repo_id}/{path}"] = Cut(after)

    def served(self, repo_id: str, path: str | None = None) -> int:
        """Body bytes sent for one file, or for every file of the repository."""
        if path is not None:
            return self.bytes_served[f"{repo_id}/{path}"]
        return sum(n for key, n in self.bytes_served.items() if key.startswith(f"{repo_id}/"))

    # ---- the handler's helpers --------------------------------------------------------------
    def _at(self, repo: Repo, rev: str) -> Repo | None:
        commit = repo.refs.get(rev, rev)
        if commit == repo.commit:
            return repo
        return repo.history.get(commit)


_API = re.compile(r"^/api/(models|datasets)/(.+?)(?:/(revision|tree)/([^/]+)(?:/.*)?)?$")
_RESOLVE = re.compile(r"^/(?:(datasets)/)?(.+?)/resolve/([^/]+)/(.+)$")


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet; tests read hub.requests

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        # ---- answers ----------------------------------------------------------------------
        def _error(self, status: int, code: str | None, message: str, commit: str = "") -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _json(self, value: Any) -> None:
            payload = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _allowed(self, repo: Repo) -> bool:
            if repo.token is None:
                return True
            auth = self.headers.get("Authorization", "")
            if not auth:
                kind = "model" if repo.repo_type == "model" else "dataset"
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to {kind} {repo.repo_id} is restricted. You must have access to it "
                    "and be authenticated to access it. Please log in.",
                )
                return False
            if auth != f"Bearer {repo.token}":
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            return True

        def _serve(self, *, body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            rng = self.headers.get("Range")
            hub.requests.append(f"{self.command} {path}" + (f" {rng}" if rng else ""))
            if m := _API.match(path):
                kind, repo_id, what, rev = m.groups()
                what, rev = what or "revision", rev or "main"
                self._api("model" if kind == "models" else "dataset", repo_id, what, rev, url)
            elif m := _RESOLVE.match(path):
                kind, repo_id, rev, file = m.groups()
                self._file("dataset" if kind else "model", repo_id, rev, file, body=body)
            else:
                self._error(404, None, "not a Hub route")

        def _api(self, repo_type: str, repo_id: str, what: str, rev: str, url: Any) -> None:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return
            if not self._allowed(repo):
                return
            at = hub._at(repo, rev)
            if at is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            if what == "tree":
                self._json([{"type": "file", "path": p, **at.entry(p)} for p in sorted(at.files)])
                return
            blobs = parse_qs(url.query).get("blobs", ["False"])[0].lower() == "true"
            siblings = []
            for p in sorted(at.files):
                sibling: dict[str, Any] = {"rfilename": p}
                if blobs:
                    entry = at.entry(p)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        sibling["lfs"] = {
                            "size": entry["size"],
                            "sha256": entry["lfs"]["oid"],
                            "pointerSize": 134,
                        }
                siblings.append(sibling)
            self._json(
                {
                    "id": repo_id,
                    "sha": at.commit,
                    "private": False,
                    "gated": "manual" if repo.token else False,
                    "siblings": siblings,
                }
            )

        def _file(self, repo_type: str, repo_id: str, rev: str, file: str, *, body: bool) -> None:
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
                return
            if not self._allowed(repo):
                return
            at = hub._at(repo, rev)
            if at is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            if file not in at.files:
                self._error(404, "EntryNotFound", f"{file} does not exist", commit=at.commit)
                return
            data = at.files[file]
            start = 0
            rng = self.headers.get("Range")
            if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
                start = int(m.group(1))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", at.commit)
            self.send_header("ETag", f'"{at.etag(file)}"')
            if len(data) >= LFS_THRESHOLD:
                self.send_header("X-Linked-Etag", f'"{at.etag(file)}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            key = f"{repo_id}/{file}"
            part = data[start:]
            cut = hub._cuts.get(key)
            if cut and not cut.done:
                cut.done = True
                part = part[: cut.after]
                self.wfile.write(part)
                self.wfile.flush()
                with hub._lock:
                    hub.bytes_served[key] += len(part)
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(part)
            with hub._lock:
                hub.bytes_served[key] += len(part)

    return Handler
