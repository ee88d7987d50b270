"""The Python client for petald's control socket (stdlib only: HTTP/1.1 over a Unix socket)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
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

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
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
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else None
        except json.JSONDecodeError:
            raise DaemonError("bad_response", f"daemon sent non-JSON ({response.status}): {data[:200]!r}") from None
        if response.status >= 400:
            err = (decoded or {}).get("error", {}) if isinstance(decoded, dict) else {}
            raise DaemonError(err.get("code", "error"), err.get("message", str(decoded)), response.status)
        return decoded

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def status(self) -> dict[str, Any]:
        return self.get("/v1/status")
