"""Control API for tensors: forward, backward and inference sessions (msgpack), and the open sessions' registry.

Tensor bodies are msgpack maps whose tensors are ``petal.protocol.tensors`` dicts (never pickle): a client in any
language can build them. The daemon does the routing, failover and wire compression; the caller only sees hidden
states in and out. Replies to tensor endpoints are msgpack; errors stay JSON ``{"error": {"code", "message"}}``
with an HTTP status, like everywhere else on the socket.

A forward with ``keep`` leaves its chain (hops, their inputs, the servers' activation ids) in the daemon for its
backward (`KeptForwards`: at most ``MAX_KEPT_FORWARDS`` and ``MAX_KEPT_BYTES``, each for ``KEPT_FORWARD_TTL_S``).

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
from petal.protocol.adapters import adapter_field
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora, parse_lora
from petal.protocol.messages import CODEC_CHOICES, check_reorder
from petal.protocol.socket_api import MSGPACK, RouteOptions, SessionRequest, model_field

log = logging.getLogger("petal.api.tensors")

MAX_SESSIONS = 64
SESSION_IDLE_S = 600.0
SWEEP_PERIOD_S = 30.0
MAX_KEPT_FORWARDS = 256
MAX_KEPT_BYTES = 1 << 30
KEPT_FORWARD_TTL_S = 60.0


def route_options(body: dict[str, Any]) -> dict[str, Any]:
    """start/end/codec/allowed/blocked/adapter, checked; what calls.forward/backward and InferenceSession take."""
    opts = RouteOptions.from_body(body, CODEC_CHOICES)
    return {
        "adapter": adapter_field(body),
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


class KeptForwards:
    """The chains of forwards run with ``keep`` (`calls.KeptChain`: hops, their inputs, the servers' activation ids),
    by random id until their backward takes them; bounded in number, bytes and age, oldest dropped first (its
    backward then recomputes, as without ``keep``)."""

    def __init__(
        self, max_entries: int = MAX_KEPT_FORWARDS, max_bytes: int = MAX_KEPT_BYTES, ttl: float = KEPT_FORWARD_TTL_S
    ) -> None:
        self.max_entries, self.max_bytes, self.ttl = max_entries, max_bytes, ttl
        self._kept: dict[str, tuple[float, calls.KeptChain]] = {}  # insertion order: oldest first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, chain: calls.KeptChain) -> str:
        self._expire()
        while self._kept and (len(self._kept) >= self.max_entries or self.nbytes + chain.nbytes > self.max_bytes):
            self._pop(next(iter(self._kept)))
        fid = secrets.token_urlsafe(12)
        self._kept[fid] = (time.monotonic(), chain)
        self.nbytes += chain.nbytes
        return fid

    def take(self, fid: str) -> calls.KeptChain | None:
        """The chain of forward ``fid``, removed; None when unknown or expired (the backward then recomputes)."""
        self._expire()
        return self._pop(fid) if fid in self._kept else None

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl
        for fid in [f for f, (t, _) in self._kept.items() if t < cutoff]:
            self._pop(fid)

    def _pop(self, fid: str) -> calls.KeptChain:
        _, chain = self._kept.pop(fid)
        self.nbytes -= chain.nbytes
        return chain


KEPT_KEY = web.AppKey("kept_forwards", KeptForwards)


def _keep(body: dict[str, Any]) -> bool:
    keep = body.get("keep", False)
    if not isinstance(keep, bool):
        raise PetalError("bad_request", "'keep' must be true or false")
    return keep


async def post_forward(request: web.Request) -> web.Response:
    """Blocks [start, end) applied to ``hidden`` through the swarm: ``{hidden}``; with ``keep: true`` every hop
    keeps its activations for the backward, and the reply adds the ``forward_id`` to give POST /v1/backward."""
    body = await read_object(request)
    model = model_field(body)
    hidden = required_tensor(body, "hidden", 3)
    mask = tensor_field(body, "mask", 2, floating=False)
    prompts = tensor_field(body, "prompts", 4)
    opts, lora, keep = route_options(body), _lora(body), _keep(body)
    router = request.app[STATE_KEY].router
    if not keep:
        out = await calls.forward(router, model, hidden, mask, prompts, **opts, lora=lora)
        return reply({"hidden": encode(out)})
    out, chain = await calls.forward_kept(router, model, hidden, mask, prompts, **opts, lora=lora)
    return reply({"hidden": encode(out), "forward_id": request.app[KEPT_KEY].add(chain)})


async def post_backward(request: web.Request) -> web.Response:
    """Gradients w.r.t. ``hidden``, ``prompts`` and LoRA weights given ``grad`` w.r.t. the output of block end-1."""
    body = await read_object(request)
    model = model_field(body)
    hidden = required_tensor(body, "hidden", 3)
    grad = required_tensor(body, "grad", 3)
    mask = tensor_field(body, "mask", 2, floating=False)
    prompts = tensor_field(body, "prompts", 4)
    opts, lora = route_options(body), _lora(body)
    fid = body.get("forward_id")
    if fid is not None and not isinstance(fid, str):
        raise PetalError("bad_request", "'forward_id' must be the string a forward with keep returned")
    kept = None if fid is None else request.app[KEPT_KEY].take(fid)  # unknown or expired: recomputed
    router = request.app[STATE_KEY].router
    grad_in, grad_prompts, grad_lora = await calls.backward(
        router, model, hidden, grad, mask, prompts, **opts, lora=lora, kept=kept
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

    Both ways in use it: POST /v1/sessions and the first message of /v1/sessions/stream (session_stream.py).
    ``with_prompts``: the body is msgpack, so it may carry tensors (``prompts``, ``lora``)."""
    req = SessionRequest.from_body(body)
    prompts = tensor_field(body, "prompts", 4) if with_prompts else None
    lora = _lora(body) if with_prompts else None
    opts = route_options(body)
    session = InferenceSession(
        app[STATE_KEY].router, req.model, req.max_length, req.batch, prompts=prompts, push=req.push, lora=lora, **opts
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


async def session_step(entry: OpenSession, body: dict[str, Any]) -> dict[str, Any]:
    """One step of an open session from a step body ``{hidden, mask?, reorder?, position?}``: the reply
    ``{hidden, position}``. ``position`` (at most the tokens cached) rolls the session back there first: the step is
    written at that position (speculative decoding drops rejected guesses this way).

    Both ways in use it: POST /v1/sessions/{id}/step and the later messages of /v1/sessions/stream."""
    hidden = required_tensor(body, "hidden", 3)
    mask = tensor_field(body, "mask", 2, floating=False)
    reorder = check_reorder(body.get("reorder"), entry.session.batch, "session step")
    position = body.get("position")
    if position is not None and (not isinstance(position, int) or isinstance(position, bool)):
        raise PetalError("bad_request", f"'position' must be an integer (tokens to keep), got {position!r:.40}")
    async with entry.lock:
        try:
            if position is not None:
                await entry.session.rollback(position)
            out = await entry.session.step(hidden, mask, reorder)
        finally:
            entry.last_used = time.monotonic()
    return {"hidden": encode(out), "position": entry.session.position}


async def post_step(request: web.Request) -> web.Response:
    """The next tokens of a session: ``{hidden, position}`` (position = tokens cached after this step)."""
    entry = request.app[REGISTRY_KEY].get(request.match_info["sid"])
    body = await read_object(request)
    return reply(await session_step(entry, body))


async def delete_session(request: web.Request) -> web.Response:
    await request.app[REGISTRY_KEY].close(request.match_info["sid"])
    return reply({"closed": True}, wants_msgpack(request))


# --- wiring ---------------------------------------------------------------------------------------------------------


def add_tensor_routes(app: web.Application) -> None:
    """Register the endpoints above; sessions are swept while the app runs and all closed when it stops."""
    registry = SessionRegistry()
    app[REGISTRY_KEY] = registry
    app[KEPT_KEY] = KeptForwards()

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
