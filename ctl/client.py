"""The Python client for petald's control socket (stdlib only: HTTP/1.1 over a Unix socket)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from collections.abc import Iterator
from typing import Any


class DaemonError(RuntimeError):
    """The daemon answered with an error, or could not be reached; `code` is the API's error code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def default_socket() -> Path:
    """Same rule as petald's default (petal.daemon.config.default_socket), without importing the daemon."""
    if os.environ.get("PETAL_SOCKET"):
        return Path(os.environ["PETAL_SOCKET"])
    if os.geteuid() == 0 or Path("/run/petal/petald.sock").exists():
        return Path("/run/petal/petald.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "petal" / "petald.sock"
    return Path(f"/tmp/petal-{os.getuid()}") / "petald.sock"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Client:
    """Synchronous JSON calls to the local daemon."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 300.0) -> None:
        self.socket_path = str(socket_path or default_socket())
        self.timeout = timeout

    def _send(self, conn: _UnixConnection, method: str, path: str, body: Any) -> http.client.HTTPResponse:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonError(
                "unavailable",
                f"no petald listening on {self.socket_path}: start one with `petald --new-swarm` "
                "(or `systemctl start petald`), or pass --socket",
            ) from None
        return conn.getresponse()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, method, path, body)
            data = response.read()
        finally:
            conn.close()
        return _decode(response, data)

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """Yield each JSON object of an NDJSON reply as it arrives; an in-band ``{"error"}`` line raises DaemonError."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, method, path, body)
            if response.status >= 400 or "ndjson" not in (response.getheader("Content-Type") or ""):
                yield _decode(response, response.read())
                return
            while line := response.readline():
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise DaemonError("bad_response", f"daemon sent a non-JSON line: {line[:200]!r}") from None
                if isinstance(obj, dict) and "error" in obj:
                    err = obj["error"] if isinstance(obj["error"], dict) else {}
                    raise DaemonError(err.get("code", "error"), err.get("message", str(obj)))
                yield obj
        finally:
            conn.close()

    def generate(self, model: str, prompt: str | None = None, **options: Any) -> Iterator[dict[str, Any]]:
        """Stream ``/v1/generate``: ``{"token", "text"}`` objects, then the final ``{"done": true, ...}``."""
        body = {"model": model, "stream": True, **({"prompt": prompt} if prompt is not None else {}), **options}
        return self.stream("POST", "/v1/generate", body)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def status(self) -> dict[str, Any]:
        return self.get("/v1/status")


def _decode(response: http.client.HTTPResponse, data: bytes) -> Any:
    try:
        decoded = json.loads(data) if data else None
    except json.JSONDecodeError:
        raise DaemonError("bad_response", f"daemon sent non-JSON ({response.status}): {data[:200]!r}") from None
    if response.status >= 400:
        err = (decoded or {}).get("error", {}) if isinstance(decoded, dict) else {}
        raise DaemonError(err.get("code", "error"), err.get("message", str(decoded)), response.status)
    return decoded
