"""The blocking WebSocket client of `Client.session_stream` against aiohttp's WebSocket server on a Unix socket."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import WSMsgType, web

from petal.ctl.websocket import OP_BINARY, HandshakeError, WebSocket, WebSocketClosed, _mask


def test_mask_is_its_own_inverse():
    key = b"\x01\x82\xff\x10"
    data = bytes(range(256)) * 3 + b"xyz"
    masked = _mask(data, key)
    assert masked != data and _mask(masked, key) == data
    assert masked[:4] == bytes(a ^ b for a, b in zip(data[:4], key, strict=True))
    assert _mask(b"", key) == b""


async def echo(request: web.Request) -> web.WebSocketResponse:
    """Echoes binary messages, each after a ping; b"close" closes with 4000."""
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type != WSMsgType.BINARY:
            break
        if msg.data == b"close":
            await ws.close(code=4000, message=b"bye")
            break
        await ws.ping(b"p")
        await ws.send_bytes(msg.data)
    return ws


@pytest.fixture
def server() -> Iterator[str]:
    path = str(Path(tempfile.mkdtemp(prefix="petal-ws-", dir="/tmp")) / "s.sock")
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, path).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def connect(path: str, target: str = "/ws") -> WebSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return WebSocket.connect(sock, target)


def test_messages_pings_and_close(server):
    ws = connect(server)
    for payload in (b"", b"a" * 125, b"b" * 126, b"c" * 70_000):  # the three length encodings
        ws.send(payload)
        assert ws.receive() == (OP_BINARY, payload)  # the ping before it was answered on the way
    ws.send(b"close")
    with pytest.raises(WebSocketClosed) as e:
        ws.receive()
    assert (e.value.code, e.value.reason) == (4000, "bye")
    with pytest.raises(WebSocketClosed):
        ws.send(b"more")
    ws.close()


def test_a_refused_upgrade_is_a_handshake_error(server):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(server)
    with pytest.raises(HandshakeError) as e:
        WebSocket.connect(sock, "/nope")
    assert e.value.status == 404
    sock.close()
