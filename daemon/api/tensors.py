"""Control API for tensors: forward, backward and inference sessions (msgpack), and the open sessions' registry.

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
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from petal.daemon.api.bodies import (
    MAX_TENSOR_BYTES,
    encode,
    read_object,
    reply,
    required_tensor,
    tensor_field,
    wants_msgpack,
)
from petal.daemon.api.state import STATE_KEY
from petal.daemon.routing import calls
from petal.daemon.routing.session import InferenceSession
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora, parse_lora
from petal.protocol.messages import CODEC_CHOICES
from petal.protocol.socket_api import MSGPACK, RouteOptions, SessionRequest, model_field

log = logging.getLogger("petal.api.tensors")

MAX_SESSIONS = 64
SESSION_IDLE_S = 600.0
SWEEP_PERIOD_S = 30.0


def route_options(body: dict[str, Any]) -> dict[str, Any]:
    """start/end/codec/allowed/blocked, checked; what calls.forward/backward and InferenceSession take."""
    opts = RouteOptions.from_body(body, CODEC_CHOICES)
    return {
        "start": opts.start,
        "end": opts.end,
        "codec": opts.codec,
        "allowed": opts.allowed,
        "blocked": opts.blocked,
    }


def _lora(body: dict[str, Any]) -> Lora | None:
    """The LoRA weights the request carries (the servers apply them and never keep them), or None."""
    if body.get("lora") is None:
        return None
    return parse_lora(body["lora"], max_bytes=MAX_TENSOR_BYTES)


# --- forward and backward -------------------------------------------------------------------------------------------


async def post_forward(request: web.Request) -> web.Response:
    """Blocks [start, end) applied to ``hidden`` through the swarm: ``{hidden}``."""
    body = await read_object(request)
    model = model_field(body)
    hidden = required_tensor(body, "hidden", 3)
    mask = tensor_field(body, "mask", 2, floating=False)
    prompts = tensor_field(body, "prompts", 4)
    opts, lora = route_options(body), _lora(body)
    out = await calls.forward(request.app[STATE_KEY].router, model, hidden, mask, prompts, **opts, lora=lora)
    return reply({"hidden": encode(out)})


async def post_backward(request: web.Request) -> web.Response:
    """Gradients w.r.t. ``hidden``, ``prompts`` and LoRA weights given ``grad`` w.r.t. the output of block end-1."""
    body = await read_object(request)
    model = model_field(body)
    hidden = required_tensor(body, "hidden", 3)
    grad = required_tensor(body, "grad", 3)
    mask = tensor_field(body, "mask", 2, floating=False)
    prompts = tensor_field(body, "prompts", 4)
    opts, lora = route_options(body), _lora(body)
    router = request.app[STATE_KEY].router
    grad_in, grad_prompts, grad_lora = await calls.backward(
        router, model, hidden, grad, mask, prompts, **opts, lora=lora
    )
    return reply(
        {
            "grad": encode(grad_in),
            "grad_prompts": encode(grad_prompts),
            "grad_lora": None if grad_lora is None else {k: encode(v) for k, v in grad_lora.items()},
        }
    )


# --- inference sessions ---------------------------------------------------------------------------------------------


@dataclass
class OpenSession:
    session: InferenceSession
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

    async def add(self, session: InferenceSession) -> str:
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


async def open_session(
    app: web.Application, body: dict[str, Any], *, with_prompts: bool = True
) -> tuple[str, dict[str, Any]]:
    """Open a session from ``body`` (the fields of POST /v1/sessions) and register it: (its id, the reply).

    Both ways in use it: POST /v1/sessions and the first message of /v1/sessions/stream (session_stream.py)."""
    req = SessionRequest.from_body(body)
    prompts = tensor_field(body, "prompts", 4) if with_prompts else None
    opts = route_options(body)
    session = InferenceSession(
        app[STATE_KEY].router, req.model, req.max_length, req.batch, prompts=prompts, push=req.push, **opts
    )
    sid = await app[REGISTRY_KEY].add(session)
    route = [{"peer": h.peer_id, "start": h.start, "end": h.end} for h in session.chain]
    return sid, {
        "session": sid,
        "model": req.model,
        "start": session.start,
        "end": session.end,
        "max_length": req.max_length,
        "batch": session.batch,
        "route": route,
    }


async def post_session(request: web.Request) -> web.Response:
    """Open an inference session: ``{session, model, start, end, max_length, batch, route}``."""
    body = await read_object(request, allow_json=True)
    _, info = await open_session(request.app, body, with_prompts=request.content_type == MSGPACK)
    return reply(info, wants_msgpack(request))


async def post_step(request: web.Request) -> web.Response:
    """The next tokens of a session: ``{hidden, position}`` (position = tokens cached after this step)."""
    entry = request.app[REGISTRY_KEY].get(request.match_info["sid"])
    body = await read_object(request)
    hidden = required_tensor(body, "hidden", 3)
    mask = tensor_field(body, "mask", 2, floating=False)
    async with entry.lock:
        try:
            out = await entry.session.step(hidden, mask)
        finally:
            entry.last_used = time.monotonic()
    return reply({"hidden": encode(out), "position": entry.session.position})


async def delete_session(request: web.Request) -> web.Response:
    await request.app[REGISTRY_KEY].close(request.match_info["sid"])
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
