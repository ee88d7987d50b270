"""A local stand-in for the Hugging Face Hub, enough for `huggingface_hub`'s real client (point `HF_ENDPOINT` at it).

It serves repos from dirs in the Hub's layout: `GET /api/models/{repo}[/revision/{rev}]` (model info with
`siblings` and sizes), and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `ETag`, `X-Repo-Commit`, `Content-Length`
and `Range` (206 with `Content-Range`). Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo). Every request is logged (`Hit`: method, path, byte range, Authorization), so tests can
assert which bytes a client fetched. `fail_after = N` lets N more ranged GETs of weight files succeed and fails the
following ones with a 500 (an interrupted pull) until it is set back to None.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str
    token: str | None = None  # gated: only `Authorization: Bearer TOKEN` may read it


@dataclass(frozen=True)
class Hit:
    method: str
    repo: str
    file: str | None  # None for API calls
    start: int | None  # byte range [start, end), None when the whole file was asked for
    end: int | None
    auth: str | None
    ok: bool = True


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    fail_after: int | None = None
    _server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, model_dir: Path, token: str | None = None) -> Repo:
        files = {
            p.relative_to(model_dir).as_posix(): p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()
        }
        sha = hashlib.sha1(repo_id.encode() + b"".join(files.values())).hexdigest()
        repo = self.repos[repo_id] = Repo(files, sha, token)
        return repo

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="hubserver").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def file_hits(self, file: str, method: str = "GET") -> list[Hit]:
        return [h for h in self.hits if h.file == file and h.method == method and h.ok]

    def fetched(self, file: str) -> list[tuple[int, int]]:
        """The byte ranges of `file` that GETs asked for (a whole-file GET is [0, size))."""
        size = len(next(iter(r.files[file] for r in self.repos.values() if file in r.files)))
        return [(h.start or 0, size if h.end is None else h.end) for h in self.file_hits(file)]


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        hub = self.server_state
        path = unquote(urlsplit(self.path).path)
        auth = self.headers.get("Authorization")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo_id, rev = m.group(1), m.group(2) or "main"
            hub.hits.append(Hit(self.command, repo_id, None, None, None, auth))
            repo = self._repo(repo_id, rev, auth)
            if repo is None:
                return
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo.token else False,
                "siblings": [
                    {"rfilename": n, "size": len(b), "blobId": hashlib.sha1(b).hexdigest()}
                    for n, b in repo.files.items()
                ],
            }
            return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None:
            return self._send(404, b"not found", {"X-Error-Code": "RepoNotFound"}, head)
        repo_id, rev, file = m.groups()
        start = end = None
        if rng := self.headers.get("Range"):
            rm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
            assert rm is not None, f"unsupported range {rng}"
            start, end = int(rm.group(1)), (int(rm.group(2)) + 1 if rm.group(2) else None)
        repo = self._repo(repo_id, rev, auth)
        if repo is None:
            hub.hits.append(Hit(self.command, repo_id, file, start, end, auth))
            return
        if file not in repo.files:
            hub.hits.append(Hit(self.command, repo_id, file, start, end, auth))
            return self._send(404, b"no such file", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}, head)
        data = repo.files[file]
        end = len(data) if end is None else min(end, len(data))
        hub.hits.append(Hit(self.command, repo_id, file, start, None if start is None else end, auth))
        headers = {
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": repo.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if not head and start is not None and file.endswith(".safetensors") and hub.fail_after is not None:
            if hub.fail_after <= 0:
                hub.hits[-1] = Hit(self.command, repo_id, file, start, end, auth, ok=False)
                return self._send(500, b"injected failure", {}, head)
            hub.fail_after -= 1
        if start is None:
            return self._send(200, data, headers, head)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        return self._send(206, data[start:end], headers, head)

    def _repo(self, repo_id: str, rev: str, auth: str | None) -> Repo | None:
        repo = self.server_state.repos.get(repo_id)
        if repo is None:
            self._send(401, b"repo not found", {"X-Error-Code": "RepoNotFound"}, self.command == "HEAD")
            return None
        if repo.token and auth != f"Bearer {repo.token}":
            self._send(401, b"gated repo", {"X-Error-Code": "GatedRepo"}, self.command == "HEAD")
            return None
        if rev not in ("main", repo.sha):
            self._send(404, b"no such revision", {"X-Error-Code": "RevisionNotFound"}, self.command == "HEAD")
            return None
        return repo

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
