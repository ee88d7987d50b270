"""Streamed inference sessions: ``GET /v1/sessions/stream`` upgraded to a WebSocket, one session per stream.

A local client opens a session with its first message and then sends one binary msgpack message per step, instead
of one HTTP request per step (``POST /v1/sessions/{id}/step``, which keeps working): no request line, headers or
connection set-up per token. The messages are those of the HTTP endpoints (``petal.protocol.socket_api``
``SESSION_STREAM_PATH`` describes them) and are read with the same readers; the session lives in the same registry,
so the same bounds hold (``MAX_SESSIONS``, the idle timeout, ``MAX_BODY_BYTES`` per message, the tensor limits).

Errors are ``{"error": {"code", "message"}}`` messages and leave the stream usable, like the HTTP endpoints'
errors leave the session usable. A message over the size limit is refused from its frame header, before it is
read: the WebSocket closes with 1009 (message too big), and its session with it. Closing the stream, from either
side, closes the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any

import msgpack
from aiohttp import WSCloseCode, WSMsgType, web

from petal.daemon import trace
from petal.daemon.api.bodies import MAX_BODY_BYTES
from petal.daemon.api.tensors import REGISTRY_KEY, SessionRegistry, open_session, session_step
from petal.protocol.errors import PetalError, WireError
from petal.protocol.frames import unpack_message
from petal.protocol.socket_api import SESSION_GONE, SESSION_STREAM_PATH, error_body

log = logging.getLogger("petal.api.stream")

CLOSE_WAIT_S = 2.0
"""How long a close waits for the client's close frame before dropping the connection."""
STREAMS_KEY = web.AppKey("session_streams", weakref.WeakSet[web.WebSocketResponse])


def _message(data: bytes) -> dict[str, Any]:
    try:
        body = unpack_message(data)
    except WireError as e:
        raise PetalError("bad_request", f"the message is not valid msgpack: {e.message}") from None
    if not isinstance(body, dict):
        raise PetalError("bad_request", "each message must be a msgpack map (object)")
    return body


async def _step(registry: SessionRegistry, sid: str, body: dict[str, Any]) -> dict[str, Any]:
    entry = registry.get(sid)  # not_found once the session timed out (the stream is then closed)
    return await session_step(entry, body)


async def get_session_stream(request: web.Request) -> web.WebSocketResponse:
    """One inference session over one WebSocket: open, then steps, until either side closes it."""
    ws = web.WebSocketResponse(max_msg_size=MAX_BODY_BYTES, timeout=CLOSE_WAIT_S, compress=False)
    if not ws.can_prepare(request).ok:
        raise PetalError(
            "bad_request", f"GET {SESSION_STREAM_PATH} is a WebSocket: send the Upgrade: websocket handshake"
        )
    await ws.prepare(request)
    app = request.app
    registry = app[REGISTRY_KEY]
    app[STREAMS_KEY].add(ws)
    sid: str | None = None
    try:
        while True:
            try:
                msg = await ws.receive(timeout=registry.idle_timeout)
            except TimeoutError:
                await ws.send_bytes(_pack(error_body("timeout", f"no message for {registry.idle_timeout:.0f} s")))
                await ws.close(code=SESSION_GONE, message=b"idle")
                break
            trace.mark("ws.in")
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
            if msg.type != WSMsgType.BINARY:
                await ws.send_bytes(
                    _pack(error_body("bad_request", "send binary WebSocket messages holding msgpack maps, not text"))
                )
                continue
            try:
                body = _message(msg.data)
                if sid is None:
                    sid, reply = await open_session(app, body)
                else:
                    reply = await _step(registry, sid, body)
            except PetalError as e:
                await ws.send_bytes(_pack(error_body(e.code, e.message)))
                if sid is not None and e.code == "not_found":
                    sid = None  # swept while idle: nothing left to close
                    await ws.close(code=SESSION_GONE, message=b"session closed")
                    break
                continue
            except Exception as e:  # a bug in one step is reported to the caller, as HTTP's 500 is
                log.exception("session stream step failed")
                await ws.send_bytes(_pack(error_body("internal", f"{type(e).__name__}: {e}")))
                continue
            await ws.send_bytes(_pack(reply))
            trace.mark("ws.out")
    except ConnectionError:
        pass  # the client went away mid-reply: close the session below
    finally:
        app[STREAMS_KEY].discard(ws)
        if sid is not None:
            with contextlib.suppress(PetalError):
                await asyncio.shield(registry.close(sid))
        if not ws.closed:
            with contextlib.suppress(Exception):
                await ws.close()
    return ws


def _pack(obj: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


async def get_sessions(request: web.Request) -> web.Response:
    """How many inference sessions are open (HTTP and streamed together), and the bounds."""
    registry = request.app[REGISTRY_KEY]
    return web.json_response(
        {
            "open": len(registry),
            "max_sessions": registry.max_sessions,
            "idle_timeout_s": registry.idle_timeout,
            "streams": len(request.app[STREAMS_KEY]),
        }
    )


def add_session_stream_routes(app: web.Application) -> None:
    """Register the stream (after ``add_tensor_routes``: it uses that registry); open streams close at shutdown."""
    streams: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
    app[STREAMS_KEY] = streams

    async def close_streams(_: web.Application) -> None:
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon stopping") for ws in list(streams)),
            return_exceptions=True,
        )

    app.on_shutdown.append(close_streams)
    app.router.add_get(SESSION_STREAM_PATH, get_session_stream)
    app.router.add_get("/v1/sessions", get_sessions)
