"""Raw HTTP over a daemon's Unix socket, for tests that send what no well-behaved client would.

``request`` sends one request with exactly the bytes given (any method, headers, body) and reads the whole reply;
``raw`` sends arbitrary bytes (not even HTTP) and parses whatever comes back. Both return a ``Reply`` and never
raise for an HTTP error status, so hostile-input tests can assert on every answer.
"""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Reply:
    status: int  # 0: the daemon closed the connection without answering
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any] | None:
        """The ``{"code", "message"}`` of a JSON error body; None if the body is not one."""
        try:
            err = self.json().get("error")
        except (ValueError, AttributeError):
            return None
        return err if isinstance(err, dict) else None


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, data = data.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def parse_reply(data: bytes) -> Reply:
    if not data:
        return Reply(0, "", b"")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Reply(0, "", data)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Reply(status, headers.get("content-type", ""), body)


def raw(socket_path: str | Path, data: bytes, timeout: float = 30.0, wait: float = 3.0) -> Reply:
    """Send ``data`` as is on a fresh connection and read until the daemon closes it (one reply).

    If the daemon neither answers nor closes within ``wait`` seconds (it waits for the rest of a request that
    will never come), the write side is shut, as by a client that gave up, and whatever comes is read.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(socket_path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered (and closed) before reading all
            s.sendall(data)
        s.settimeout(wait)
        chunks: list[bytes] = []
        gave_up = False
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            except TimeoutError:
                if chunks or gave_up:
                    break
                gave_up = True
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)
                continue
            if not chunk:
                break
            chunks.append(chunk)
    return parse_reply(b"".join(chunks))


def request(
    socket_path: str | Path,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One HTTP/1.1 request (``Connection: close``); ``Content-Length`` is added unless ``headers`` set a length
    or a transfer encoding."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else (body or b"")
    hdrs = {"Host": "localhost", "Connection": "close", **(headers or {})}
    if data and not any(k.lower() in ("content-length", "transfer-encoding") for k in hdrs):
        hdrs["Content-Length"] = str(len(data))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return raw(socket_path, head.encode("utf-8", "surrogateescape") + data, timeout, wait=timeout)
