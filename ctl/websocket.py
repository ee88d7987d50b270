"""A minimal blocking WebSocket client (RFC 6455) over a Unix socket, for `Client.session_stream`.

Only what a session stream needs: the handshake, binary messages out (masked, as clients must), binary messages
in (fragmented or not), pings answered, closes seen. The stdlib has no WebSocket client and the synchronous
`Client` runs no event loop, so this is the blocking counterpart of aiohttp's ``ws_connect`` (which `AsyncClient`
uses). The peer is the local daemon; frame lengths are still checked against ``max_message``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
from typing import Final

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WebSocketClosed(ConnectionError):
    """The daemon closed the stream (``code`` and ``reason`` from its close frame, 1006 when none came)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"stream closed by the daemon ({code}{': ' + reason if reason else ''})")
        self.code, self.reason = code, reason


class HandshakeError(ConnectionError):
    """The daemon answered the upgrade with an HTTP reply instead: ``status`` and the reply's body."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket upgrade refused with HTTP {status}")
        self.status, self.body = status, body


def _mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return data
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


class WebSocket:
    """One WebSocket connection on an already connected stream socket."""

    def __init__(self, sock: socket.socket, max_message: int = 1 << 40) -> None:
        self.sock = sock
        self.max_message = max_message
        self._buf = bytearray()
        self.closed = False

    @classmethod
    def connect(cls, sock: socket.socket, path: str, host: str = "localhost") -> WebSocket:
        """The handshake for ``GET path`` on ``sock``; HandshakeError if the server answers without upgrading."""
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(request.encode())
        ws = cls(sock)
        head = ws._read_until(b"\r\n\r\n", 64 * 1024)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 101:
            length = int(headers.get("content-length", "0") or 0)
            raise HandshakeError(status, ws._read_exact(min(length, 1 << 20)))
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise HandshakeError(status, b"the server's Sec-WebSocket-Accept does not match the key")
        return ws

    # --- reading -------------------------------------------------------------------------------------------------

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            self.closed = True
            raise WebSocketClosed(1006, "connection lost")
        self._buf += chunk

    def _read_until(self, marker: bytes, limit: int) -> bytes:
        while (end := self._buf.find(marker)) < 0:
            if len(self._buf) > limit:
                raise HandshakeError(0, b"the upgrade reply's head is too long")
            self._fill()
        head = bytes(self._buf[:end])
        del self._buf[: end + len(marker)]
        return head

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read_exact(2)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8))
        if length > self.max_message:
            raise WebSocketClosed(1009, f"the daemon sent a {length}-byte frame, over {self.max_message}")
        key = self._read_exact(4) if b1 & 0x80 else b""
        payload = self._read_exact(length)
        return bool(b0 & 0x80), b0 & 0x0F, _mask(payload, key) if key else payload

    def receive(self) -> tuple[int, bytes]:
        """The next data message (opcode, payload); pings are answered; a close raises WebSocketClosed."""
        if self.closed:
            raise WebSocketClosed(1006, "the stream is closed")
        parts: list[bytes] = []
        opcode = OP_CONT
        while True:
            fin, op, payload = self._frame()
            if op == OP_PING:
                self._send_frame(OP_PONG, payload)
                continue
            if op == OP_PONG:
                continue
            if op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                if not self.closed:
                    self.closed = True
                    with contextlib.suppress(OSError):
                        self._send_frame(OP_CLOSE, payload[:2])
                raise WebSocketClosed(code, reason)
            if op != OP_CONT:
                opcode = op
            parts.append(payload)
            if sum(map(len, parts)) > self.max_message:
                raise WebSocketClosed(1009, f"the daemon sent a message over {self.max_message} bytes")
            if fin:
                return opcode, b"".join(parts)

    # --- writing -------------------------------------------------------------------------------------------------

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = os.urandom(4)
        self.sock.sendall(head + key + _mask(payload, key))

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        """Send one message; if the daemon has closed the stream, WebSocketClosed with its close code."""
        if self.closed:
            raise WebSocketClosed(1006, "the stream is closed")
        try:
            self._send_frame(opcode, payload)
        except OSError:
            closed = self._close_frame()
            if closed is None:
                raise
            raise closed from None

    def _close_frame(self) -> WebSocketClosed | None:
        """The daemon's close frame, if one is waiting (after a failed send), else None."""
        try:
            self.sock.settimeout(1.0)
            while True:
                self.receive()
        except WebSocketClosed as e:
            return e
        except OSError:
            return None

    def close(self, code: int = 1000) -> None:
        """Send a close frame, wait briefly for the daemon's, and close the socket."""
        try:
            if not self.closed:
                self.closed = True
                self._send_frame(OP_CLOSE, struct.pack("!H", code))
                self.sock.settimeout(2.0)
                while True:
                    _, op, _ = self._frame()
                    if op == OP_CLOSE:
                        break
        except (OSError, WebSocketClosed):
            pass
        finally:
            self.sock.close()
