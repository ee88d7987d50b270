"""The block server: hosts a span of one model's blocks and serves info, forward, backward, inference and push over
libp2p (paper §2.1, §3.2), and announces itself under every hosted block's key.

Every request goes through `petal.protocol.messages` validators first; every failure becomes an error frame
(`ErrorReply`) and the server goes on serving everyone else. Compute runs on one thread (`Jobs`), the KV budget is
reserved at start (`KVPool`), and each inference stream is an `InferenceSession`.

Sharing the cache: while another peer waits for room, sessions idle for `contended_idle_timeout` (and sessions of
a peer holding more than its `peer_share` of the budget) are closed, so one peer cannot hold the whole cache
(`_reclaim`). Leaving: `drain` announces the state "draining" (routers skip it), refuses new sessions with
"unavailable", lets open ones finish for up to `drain_timeout` (idle ones are closed after the idle grace), closes
the rest (their clients fail over with their history) and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from petal.daemon import trace
from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Stream, StreamClosed, Transport
from petal.daemon.serving.compute import SpanCompute
from petal.daemon.serving.errors import ErrorReply
from petal.daemon.serving.inference import InferenceSession
from petal.daemon.serving.kv_pool import KVPool
from petal.daemon.serving.push import NextHops, Pusher, PushInbox
from petal.daemon.serving.settings import DEFAULT_CACHE_TOKENS_PER_BLOCK, DEFAULT_SETTINGS, DTYPES, ServeSettings
from petal.daemon.serving.worker import TRAINING, Jobs
from petal.protocol import PROTOCOL_VERSION
from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    CODECS,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
    ForwardRequest,
    PushRequest,
    ServedSpan,
    error_reply,
    parse_forward,
    parse_info_request,
    parse_open,
    parse_push,
)
from petal.protocol.records import MODELS_KEY, ModelRecord, ServerRecord, block_key
from petal.protocol.replies import BackwardReply, ForwardReply, InfoReply, PushAck
from petal.protocol.tensors import decode_tensor

if TYPE_CHECKING:
    from petal.kernels.span import Span

log = logging.getLogger("petal.server")

FIRST_MESSAGE_TIMEOUT = 30.0  # a caller that opens a stream must say what it wants within this

Announce = Callable[[str, dict[str, Any]], Awaitable[object]]
"""Publish a value under a DHT key and keep it alive (the node re-announces it until withdrawn)."""
Withdraw = Callable[[str], Awaitable[object]]
"""Stop announcing under a DHT key."""


class Reply(Protocol):
    """A typed block reply (`petal.protocol.replies`): the handler sends its wire form."""

    def to_wire(self) -> dict[str, Any]: ...


class BlockServer:
    """Serves blocks `[span.start, span.end)` of one model on `transport`; `announce`/`withdraw` (optional) publish
    it in the DHT."""

    def __init__(
        self,
        span: Span,
        *,
        model: str,
        fingerprint: str,
        family: str,
        num_blocks: int,
        transport: Transport,
        settings: ServeSettings = DEFAULT_SETTINGS,
        announce: Announce | None = None,
        withdraw: Withdraw | None = None,
        throughput: float = 0.0,
        dht: SwarmDHT | None = None,
    ) -> None:
        self.span = span
        self.model = model
        self.fingerprint = fingerprint
        self.family = family
        self.num_blocks = num_blocks
        self.transport = transport
        self.settings = settings
        self.throughput = throughput
        self._announce = announce
        self._withdraw = withdraw
        self.dtype = DTYPES[settings.dtype]
        self.device = torch.device(settings.device)
        self.compute = SpanCompute(span, self.dtype, self.device, lie=settings.test_lie)
        self.served = ServedSpan(
            model=model,
            fingerprint=fingerprint,
            start=span.start,
            end=span.end,
            hidden_size=span.hidden_size,
            max_batch=settings.max_batch,
            max_length=settings.max_length,
        )
        kv_heads, head_dim = span.family.kv_shape(span.config)
        budget = settings.max_cache_tokens or DEFAULT_CACHE_TOKENS_PER_BLOCK * len(span.blocks)
        self.pool = KVPool(budget, kv_heads, head_dim, self.dtype, self.device, peer_share=settings.peer_share)
        self.jobs = Jobs(settings.max_queue, settings.request_timeout, name=f"petal-compute-{span.start}-{span.end}")
        self.sessions = 0
        self._refresher: asyncio.Task[None] | None = None
        self._published_cache = -1
        self._inboxes: dict[str, PushInbox] = {}  # session id -> pushed inputs, for sessions opened with push
        self._live: set[InferenceSession] = set()
        self._no_sessions = asyncio.Event()  # set while no inference session is open
        self._no_sessions.set()
        self._state = "online"  # what the refresh loop re-announces: "online", or "draining" once leaving
        self._reclaimer: asyncio.Task[None] | None = None
        self.next_hops = NextHops(dht, model, fingerprint)

    # lifecycle

    @property
    def keys(self) -> list[str]:
        return [block_key(self.model, b) for b in range(self.span.start, self.span.end)]

    async def start(self) -> None:
        self.jobs.start()
        self.transport.set_handler(INFO_PROTOCOL, self._handle_info)
        self.transport.set_handler(FORWARD_PROTOCOL, self._handle_forward)
        self.transport.set_handler(BACKWARD_PROTOCOL, self._handle_backward)
        self.transport.set_handler(INFERENCE_PROTOCOL, self._handle_inference)
        self.transport.set_handler(PUSH_PROTOCOL, self._handle_push)
        await self.publish("online")
        self._reclaimer = asyncio.create_task(self._reclaim_loop(), name="block-server-reclaim")
        if self._announce is not None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="block-server-refresh")
        log.info(
            "serving %s blocks [%d, %d) (%s, %s, quant %s): %.0f tokens/s, KV budget %d token-blocks (%.1f MiB)",
            self.model,
            self.span.start,
            self.span.end,
            self.settings.device,
            self.settings.dtype,
            self.settings.quant,
            self.throughput,
            self.pool.units,
            self.pool.nbytes / 2**20,
        )

    async def stop(self) -> None:
        """Stop taking work, withdraw the announcements, end the compute thread."""
        if not self.jobs.open:
            return
        self.jobs.close()
        for task in (self._refresher, self._reclaimer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._withdraw is not None:
            for key in self.keys:
                try:
                    await asyncio.wait_for(self._withdraw(key), timeout=3.0)
                except Exception as e:  # noqa: BLE001 - the entry expires on its own
                    log.info("could not withdraw %s: %s", key, e)
        await self.jobs.stop()

    @property
    def draining(self) -> bool:
        return self._state == "draining"

    async def drain(self, timeout: float | None = None) -> None:
        """Leave gracefully, then `stop`: announce "draining" (routers stop sending new work), refuse new sessions,
        let open ones finish for up to `timeout` (default `settings.drain_timeout`; idle ones are closed after the
        idle grace), then close those left: their clients fail over, replaying their history elsewhere."""
        if not self.jobs.open:
            return
        timeout = self.settings.drain_timeout if timeout is None else timeout
        if not self.draining:
            self._state = "draining"
            log.info(
                "draining %s blocks [%d, %d): %d open session(s), at most %.0f s",
                self.model,
                self.span.start,
                self.span.end,
                len(self._live),
                timeout,
            )
            await self.publish("draining")
        self._reclaim()  # idle sessions are closed from here on by the reclaim loop
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_sessions.wait(), timeout)
        if self._live:
            error = PetalError("unavailable", "this server is shutting down; the session continues on another server")
            for session in list(self._live):
                session.evict(error)
            with contextlib.suppress(TimeoutError):  # a session mid-step ends after its step
                await asyncio.wait_for(self._no_sessions.wait(), 5.0)
        await self.stop()

    async def _reclaim_loop(self) -> None:
        period = min(max(self.settings.contended_idle_timeout / 4, 0.02), 1.0)
        while True:
            await asyncio.sleep(period)
            self._reclaim()

    def _reclaim(self) -> None:
        """While other peers wait for cache (or the server drains), close sessions idle for the grace, and sessions of
        a peer over its share of a contended pool, so that no peer can keep the cache from everyone else."""
        waiting = self.pool.waiting
        if not waiting and not self.draining:
            return
        grace = self.settings.contended_idle_timeout
        now = time.monotonic()
        for session in sorted(self._live, key=lambda s: -s.opened_at):  # newest first
            others_wait = any(w != session.owner for w in waiting)
            if not (others_wait or self.draining):
                continue
            if session.idle_for() >= grace:
                reason = "other peers wait for this server's KV cache" if others_wait else "this server is leaving"
                code = "busy" if others_wait else "unavailable"
                session.evict(PetalError(code, f"session closed after {grace:.0f}s idle: {reason}; open a new one"))
            elif others_wait and now - session.opened_at >= grace and self.pool.over_share(session.owner):
                session.evict(
                    PetalError(
                        "busy",
                        f"session closed: peer {session.owner} holds more than its share "
                        f"({self.pool.peer_share:.0%}) of this server's KV cache while others wait",
                    )
                )

    # announcements

    def record(self, state: str) -> dict[str, Any]:
        """The value announced under every hosted block's key."""
        return ServerRecord(
            addrs=tuple(self.transport.listen_addrs),
            start=self.span.start,
            end=self.span.end,
            state=state,
            throughput=round(self.throughput, 3),
            cache_tokens_left=self.cache_tokens_left,
            dtype=self.settings.dtype,
            version=PROTOCOL_VERSION,
            quant=self.settings.quant,
            fingerprint=self.fingerprint,
            direct=tuple(getattr(self.transport, "direct_addrs", ())),
            public_name=self.settings.public_name,
        ).to_value()

    @property
    def cache_tokens_left(self) -> int:
        """Tokens a new session could still cache on every hosted block."""
        return self.pool.free_units // len(self.span.blocks)

    async def _refresh_loop(self) -> None:
        """Re-announce when the free KV budget moved by over a tenth of the total, so routers see real capacity."""
        while True:
            await asyncio.sleep(self.settings.refresh_period)
            if abs(self.cache_tokens_left - self._published_cache) * 10 > self.pool.units // len(self.span.blocks):
                await self.publish(self._state)

    async def republish(self) -> None:
        """Announce the current record again (e.g. with a newly measured throughput); nothing once stopped."""
        if self.jobs.open:
            await self.publish(self._state)

    async def publish(self, state: str) -> None:
        """Announce this span in `state` under every hosted block's key and the model under MODELS_KEY."""
        if self._announce is None:
            return
        value = self.record(state)
        self._published_cache = value["c"]
        model = ModelRecord(self.model, self.fingerprint, self.num_blocks, self.family).to_value()
        results = await asyncio.gather(
            *(self._announce(key, value) for key in self.keys),
            self._announce(MODELS_KEY, model),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                log.warning("announcing %s blocks [%d, %d) failed: %s", self.model, self.span.start, self.span.end, r)

    def info(self) -> InfoReply:
        """The info RPC's reply."""
        return InfoReply(
            model=self.model,
            fingerprint=self.fingerprint,
            family=self.family,
            num_blocks=self.num_blocks,
            start=self.span.start,
            end=self.span.end,
            hidden_size=self.span.hidden_size,
            dtype=self.settings.dtype,
            quant=self.settings.quant,
            max_length=self.settings.max_length,
            max_batch=self.settings.max_batch,
            cache_tokens_left=self.cache_tokens_left,
            throughput=self.throughput,
            version=PROTOCOL_VERSION,
            codecs=tuple(CODECS),
            sessions=self.sessions,
            push=True,
        )

    # handlers

    async def _reply(self, stream: Stream, work: Callable[[object], Awaitable[Reply]]) -> None:
        """One request, one reply (sent in its wire form); every failure becomes an error frame."""
        msg = await stream.recv(timeout=FIRST_MESSAGE_TIMEOUT)
        with ErrorReply(f"{stream.protocol_id} request") as out:
            out.reply = (await work(msg)).to_wire()
        await stream.send(out.reply)

    async def forward_local(
        self, start: int, end: int, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None
    ) -> torch.Tensor:
        """Blocks [start, end) of this span on ``hidden`` for this daemon's own client side (the trusted reference
        of spot checks), queued like a forward request, lossless."""
        req = ForwardRequest(start, end, hidden, mask, prompts, "none")
        reply = await self.jobs.run(TRAINING, self.compute.forward, req)
        return decode_tensor(reply.hidden).to(hidden.dtype)

    async def _handle_info(self, stream: Stream) -> None:
        async def work(msg: object) -> InfoReply:
            parse_info_request(msg, self.served)
            return self.info()

        await self._reply(stream, work)

    async def _handle_forward(self, stream: Stream) -> None:
        async def work(msg: object) -> ForwardReply:
            return await self.jobs.run(TRAINING, self.compute.forward, parse_forward(msg, self.served))

        await self._reply(stream, work)

    async def _handle_backward(self, stream: Stream) -> None:
        async def work(msg: object) -> BackwardReply:
            req = parse_forward(msg, self.served, backward=True)
            return await self.jobs.run(TRAINING, self.compute.backward, req)

        await self._reply(stream, work)

    async def _handle_inference(self, stream: Stream) -> None:
        """Open (reserve a cache), then serve the stream as an `InferenceSession` until it ends."""
        msg = await stream.recv(timeout=FIRST_MESSAGE_TIMEOUT)
        try:
            if not self.jobs.open or self.draining:
                raise PetalError("unavailable", "this server is shutting down; use another one")
            opened = parse_open(msg, self.served)
            blocks = opened.end - opened.start
            allocation = await self.pool.allocate(
                blocks, opened.batch, opened.max_length, self.settings.alloc_timeout, owner=stream.peer_id
            )
        except PetalError as e:
            await stream.send(error_reply(e))
            return
        if self.draining:  # started leaving while this session waited for room
            self.pool.free(allocation)
            await stream.send(error_reply(PetalError("unavailable", "this server is shutting down; use another one")))
            return
        session_id = secrets.token_hex(16)
        inbox = PushInbox(opened.batch, opened.max_length) if opened.push else None
        session = InferenceSession(
            stream,
            opened,
            allocation,
            session_id=session_id,
            served=self.served,
            settings=self.settings,
            compute=self.compute,
            jobs=self.jobs,
            pool=self.pool,
            pusher=Pusher(self.transport, self._deliver, functools.partial(self.next_hops.resolve, opened.end)),
            inbox=inbox,
        )
        if inbox is not None:
            self._inboxes[session_id] = inbox
        self.sessions += 1
        self._live.add(session)
        self._no_sessions.clear()
        try:
            await session.run()
        finally:
            self.sessions -= 1
            self._live.discard(session)
            if not self._live:
                self._no_sessions.set()
            self._inboxes.pop(session_id, None)

    def _deliver(self, sender: str, push: PushRequest) -> None:
        """Hand a validated push to its session's inbox; raises PetalError for the pusher's error frame."""
        inbox = self._inboxes.get(push.session)
        if inbox is None:
            raise PetalError(
                "not_found",
                f"push: no inference session {push.session[:8]}… here takes pushes (it "
                "ended, or was opened without push: true)",
            )
        inbox.put(sender, push.step, push.hidden)

    async def _handle_push(self, stream: Stream) -> None:
        """Pushes from one previous hop, one ack (`PushAck` or an error frame) each, until it closes."""
        while True:
            try:
                msg = await stream.recv(timeout=self.settings.idle_timeout)
            except (StreamClosed, TimeoutError):
                return
            trace.mark("push.in")
            with ErrorReply(f"push from {stream.peer_id}") as out:
                self._deliver(stream.peer_id, parse_push(msg, self.served))
                out.reply = PushAck().to_wire()
            await stream.send(out.reply)
