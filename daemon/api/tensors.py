"""Control API for tensors: forward, backward and inference sessions (msgpack).

Tensor bodies are msgpack maps whose tensors are ``petal.protocol.tensors`` dicts (never pickle): a client in any
language can build them. The daemon does the routing, failover and wire compression; the caller only sees hidden
states in and out. Replies to tensor endpoints are msgpack; errors stay JSON ``{"error": {"code", "message"}}``
with an HTTP status, like everywhere else on the socket.

Inference sessions live in the daemon between calls (the servers hold the KV cache, the daemon holds the history
for failover), so they are bounded: at most ``MAX_SESSIONS`` open, closed after ``SESSION_IDLE_S`` without a step,
and all closed when the daemon stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch
from aiohttp import web

from petal.daemon.api.generate import STATE_KEY, ApiState, http_error
from petal.daemon.routing import session as sessions
from petal.protocol.errors import PetalError, WireError
from petal.protocol.tensors import CODECS, DEFAULT_MAX_BYTES, DTYPE_NAMES, FLOAT_DTYPES, decode_tensor, encode_tensor

log = logging.getLogger("petal.api.tensors")

MSGPACK = "application/x-msgpack"
MAX_BODY_BYTES = 256 * 1024 * 1024
"""Largest msgpack body accepted; a bigger one is refused (413) from its Content-Length, before it is read."""
MAX_TENSOR_BYTES = DEFAULT_MAX_BYTES
MAX_SESSIONS = 64
SESSION_IDLE_S = 600.0
SWEEP_PERIOD_S = 30.0


def _fail(code: str, message: str) -> Exception:
    return http_error(PetalError(code, message))


# --- bodies ---------------------------------------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refusing (413) one over ``limit`` bytes by its declared length or while it streams in."""
    if request.content_length is not None and request.content_length > limit:
        raise _fail(
            "too_large",
            f"the body is {request.content_length} bytes; at most {limit} are accepted: "
            "send a smaller batch or fewer tokens per call",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > limit:
            raise _fail("too_large", f"the body is over {limit} bytes; send a smaller batch or fewer tokens per call")
        chunks.append(chunk)
    return b"".join(chunks)


def wants_msgpack(request: web.Request) -> bool:
    return request.content_type == MSGPACK or MSGPACK in request.headers.get("Accept", "")


async def read_object(request: web.Request, *, allow_json: bool = False) -> dict[str, Any]:
    """A msgpack (or, where allowed, JSON) object body; anything else is a 400 that says what to send."""
    data = await read_body(request)
    if request.content_type != MSGPACK:
        if not allow_json:
            raise _fail("bad_request", f"send this endpoint a msgpack body with Content-Type: {MSGPACK}")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise _fail("bad_request", f"request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    else:
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:  # FormatError, ExtraData, ... too
            raise _fail(
                "bad_request", f"request body is not valid msgpack: {type(e).__name__}: {str(e)[:200]}"
            ) from None
    if not isinstance(body, dict):
        raise _fail("bad_request", "the request body must be a map (object)")
    return body


def reply(obj: dict[str, Any], as_msgpack: bool = True, status: int = 200) -> web.Response:
    if not as_msgpack:
        return web.json_response(obj, status=status)
    return web.Response(body=msgpack.packb(obj, use_bin_type=True), content_type=MSGPACK, status=status)


def _tensor(
    body: dict[str, Any], key: str, ndim: int, *, required: bool = False, floating: bool = True
) -> torch.Tensor | None:
    obj = body.get(key)
    if obj is None:
        if required:
            raise _fail("bad_request", f"{key!r} is required: a tensor map {{dtype, shape, codec, data}}")
        return None
    try:
        t = decode_tensor(obj, max_bytes=MAX_TENSOR_BYTES)
    except WireError as e:
        raise _fail(e.code, f"{key!r}: {e.message}") from None
    if floating and DTYPE_NAMES[t.dtype] not in FLOAT_DTYPES:
        raise _fail("bad_tensor", f"{key!r} must be float32, float16 or bfloat16, got {DTYPE_NAMES[t.dtype]}")
    if not floating and (t.dtype.is_floating_point or t.dtype == torch.uint8):
        raise _fail(
            "bad_tensor",
            f"{key!r} must be int64, int32 or bool (1 = real token, 0 = padding), got {DTYPE_NAMES[t.dtype]}",
        )
    if t.dim() != ndim:
        raise _fail("wrong_shape", f"{key!r} must have {ndim} dimensions, got shape {list(t.shape)}")
    return t


def _int(body: dict[str, Any], key: str, default: int | None, minimum: int = 0) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail("bad_request", f"{key!r} must be an integer >= {minimum}, got {value!r:.80}")
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("bad_request", 'name the model: "model": "smollm2"')
    return model


def _peers(body: dict[str, Any], key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise _fail("bad_request", f"{key!r} must be a list of peer ids")
    return value


def route_options(body: dict[str, Any]) -> dict[str, Any]:
    """start/end/codec/allowed/blocked, checked; what session.forward/backward and InferenceSession take."""
    codec = body.get("codec")
    if codec is not None and codec not in CODECS:
        raise _fail("bad_request", f"'codec' must be one of {list(CODECS)}, got {codec!r:.80}")
    return {
        "start": _int(body, "start", 0),
        "end": _int(body, "end", None, 1),
        "codec": codec,
        "allowed": _peers(body, "allowed"),
        "blocked": _peers(body, "blocked"),
    }


def _lora(body: dict[str, Any]) -> dict[str, Any]:
    """``{"lora": Lora}`` when the request carries one, else ``{}`` (so daemons without LoRA support still work)."""
    if body.get("lora") is None:
        return {}
    from petal.protocol.lora import parse_lora

    try:
        return {"lora": parse_lora(body["lora"], max_bytes=MAX_TENSOR_BYTES)}
    except PetalError as e:
        raise http_error(e) from None


def _encode(t: torch.Tensor | None) -> dict[str, Any] | None:
    return None if t is None else encode_tensor(t, "none")


# --- forward and backward -------------------------------------------------------------------------------------------


def _state(request: web.Request) -> ApiState:
    return request.app[STATE_KEY]


async def post_forward(request: web.Request) -> web.Response:
    """Blocks [start, end) applied to ``hidden`` through the swarm: ``{hidden}``."""
    body = await read_object(request)
    model = _model(body)
    hidden = _tensor(body, "hidden", 3, required=True)
    mask = _tensor(body, "mask", 2, floating=False)
    prompts = _tensor(body, "prompts", 4)
    opts, lora = route_options(body), _lora(body)
    try:
        out = await sessions.forward(_state(request).router, model, hidden, mask, prompts, **opts, **lora)
    except PetalError as e:
        raise http_error(e) from None
    return reply({"hidden": _encode(out)})


async def post_backward(request: web.Request) -> web.Response:
    """Gradients w.r.t. ``hidden``, ``prompts`` and LoRA weights given ``grad`` w.r.t. the output of block end-1."""
    body = await read_object(request)
    model = _model(body)
    hidden = _tensor(body, "hidden", 3, required=True)
    grad = _tensor(body, "grad", 3, required=True)
    mask = _tensor(body, "mask", 2, floating=False)
    prompts = _tensor(body, "prompts", 4)
    opts, lora = route_options(body), _lora(body)
    try:
        result = await sessions.backward(_state(request).router, model, hidden, grad, mask, prompts, **opts, **lora)
    except PetalError as e:
        raise http_error(e) from None
    grad_in, grad_prompts = result[0], result[1]
    grad_lora = result[2] if len(result) > 2 else None
    return reply(
        {
            "grad": _encode(grad_in),
            "grad_prompts": _encode(grad_prompts),
            "grad_lora": None if grad_lora is None else {k: _encode(v) for k, v in grad_lora.items()},
        }
    )


# --- inference sessions ---------------------------------------------------------------------------------------------


@dataclass
class OpenSession:
    session: sessions.InferenceSession
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # steps of one session run one after another


class SessionRegistry:
    """Open inference sessions by random id; bounded in number and idle time, because each holds server caches."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_timeout: float = SESSION_IDLE_S) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._open: dict[str, OpenSession] = {}
        self._opening = 0
        self._sweeper: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._open)

    async def add(self, session: sessions.InferenceSession) -> str:
        """Open ``session`` (finds its chain) and register it; "busy" when too many are open."""
        if len(self._open) + self._opening >= self.max_sessions:
            raise PetalError(
                "busy",
                f"{self.max_sessions} inference sessions are open on this daemon; close some "
                "(DELETE /v1/sessions/{id}) or wait for idle ones to time out",
            )
        self._opening += 1
        try:
            await session.open()
        except BaseException:
            await session.close()
            raise
        finally:
            self._opening -= 1
        sid = secrets.token_urlsafe(12)
        self._open[sid] = OpenSession(session)
        return sid

    def get(self, sid: str) -> OpenSession:
        entry = self._open.get(sid)
        if entry is None:
            raise PetalError(
                "not_found",
                f"no open session {sid!r}: it was closed, timed out after "
                f"{self.idle_timeout:.0f}s idle, or the daemon restarted; open a new one",
            )
        entry.last_used = time.monotonic()
        return entry

    async def close(self, sid: str) -> None:
        entry = self._open.pop(sid, None)
        if entry is None:
            raise PetalError("not_found", f"no open session {sid!r}")
        await entry.session.close()

    async def sweep(self) -> int:
        """Close the sessions idle for longer than ``idle_timeout`` (not one mid-step); returns how many."""
        now = time.monotonic()
        idle = [sid for sid, e in self._open.items() if now - e.last_used > self.idle_timeout and not e.lock.locked()]
        for sid in idle:
            log.info("closing inference session %s: no step for %.0f s", sid, self.idle_timeout)
            with contextlib.suppress(PetalError):
                await self.close(sid)
        return len(idle)

    def start(self, period: float = SWEEP_PERIOD_S) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(period)
                try:
                    await self.sweep()
                except Exception as e:  # noqa: BLE001 - the next sweep tries again
                    log.warning("closing idle sessions failed: %s", e)

        self._sweeper = asyncio.create_task(loop(), name="session-sweeper")

    async def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        entries, self._open = list(self._open.values()), {}
        await asyncio.gather(*(e.session.close() for e in entries), return_exceptions=True)


REGISTRY_KEY = web.AppKey("sessions", SessionRegistry)


async def post_session(request: web.Request) -> web.Response:
    """Open an inference session: ``{session, model, start, end, max_length, batch, route}``."""
    body = await read_object(request, allow_json=True)
    model = _model(body)
    max_length = _int(body, "max_length", None, 1)
    if max_length is None:
        raise _fail("bad_request", '"max_length" (the most tokens this session will hold) is required')
    batch = _int(body, "batch", 1, 1)
    prompts = _tensor(body, "prompts", 4) if request.content_type == MSGPACK else None
    opts = route_options(body)
    session = sessions.InferenceSession(_state(request).router, model, max_length, batch or 1, prompts=prompts, **opts)
    try:
        sid = await request.app[REGISTRY_KEY].add(session)
    except PetalError as e:
        raise http_error(e) from None
    route = [{"peer": h.peer_id, "start": h.start, "end": h.end} for h in session.chain]
    return reply(
        {
            "session": sid,
            "model": model,
            "start": session.start,
            "end": session.end,
            "max_length": max_length,
            "batch": session.batch,
            "route": route,
        },
        wants_msgpack(request),
    )


async def post_step(request: web.Request) -> web.Response:
    """The next tokens of a session: ``{hidden, position}`` (position = tokens cached after this step)."""
    registry = request.app[REGISTRY_KEY]
    try:
        entry = registry.get(request.match_info["sid"])
    except PetalError as e:
        raise http_error(e) from None
    body = await read_object(request)
    hidden = _tensor(body, "hidden", 3, required=True)
    mask = _tensor(body, "mask", 2, floating=False)
    async with entry.lock:
        try:
            out = await entry.session.step(hidden, mask)
        except PetalError as e:
            raise http_error(e) from None
        finally:
            entry.last_used = time.monotonic()
    return reply({"hidden": _encode(out), "position": entry.session.position})


async def delete_session(request: web.Request) -> web.Response:
    try:
        await request.app[REGISTRY_KEY].close(request.match_info["sid"])
    except PetalError as e:
        raise http_error(e) from None
    return reply({"closed": True}, wants_msgpack(request))


# --- wiring ---------------------------------------------------------------------------------------------------------


def add_tensor_routes(app: web.Application) -> None:
    """Register the endpoints above; sessions are swept while the app runs and all closed when it stops."""
    registry = SessionRegistry()
    app[REGISTRY_KEY] = registry

    async def lifetime(_: web.Application) -> AsyncIterator[None]:
        registry.start()
        yield
        await registry.close_all()

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/forward", post_forward)
    app.router.add_post("/v1/backward", post_backward)
    app.router.add_post("/v1/sessions", post_session)
    app.router.add_post("/v1/sessions/{sid}/step", post_step)
    app.router.add_delete("/v1/sessions/{sid}", delete_session)
