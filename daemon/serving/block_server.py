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
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import PeerAddr, Stream, Transport
from petal.daemon.serving.activations import MIN_DEFAULT_BUDGET, ActivationStore
from petal.daemon.serving.adapters import AdapterCompute
from petal.daemon.serving.batching import forward_batch
from petal.daemon.serving.compute import KeptForward, SpanCompute
from petal.daemon.serving.dispatch import FIRST_MESSAGE_TIMEOUT, BlockDispatcher, dispatcher_for
from petal.daemon.serving.errors import ErrorReply
from petal.daemon.serving.inference import InferenceSession
from petal.daemon.serving.kv_pool import KVPool
from petal.daemon.serving.push import NextHops, Pusher, PushInbox
from petal.daemon.serving.settings import DEFAULT_CACHE_TOKENS_PER_BLOCK, DEFAULT_SETTINGS, DTYPES, ServeSettings
from petal.daemon.serving.worker import TRAINING, Jobs
from petal.protocol import PROTOCOL_VERSION
from petal.protocol.adapters import request_adapter
from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    CODECS,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    ForwardRequest,
    PushRequest,
    ServedSpan,
    error_reply,
    parse_forward,
    parse_info_request,
    parse_open,
    parse_push,
)
from petal.protocol.records import (
    MAX_NEXT_PINGS,
    MODELS_KEY,
    OFFLINE,
    ModelRecord,
    RecordError,
    ServerRecord,
    block_key,
    check_announcement,
)
from petal.protocol.replies import BackwardReply, ForwardReply, InfoReply, PushAck
from petal.protocol.tensors import decode_tensor

if TYPE_CHECKING:
    from petal.kernels.span import Span
    from petal.protocol.lora import Lora

log = logging.getLogger("petal.server")

NEXT_PING_SCHEDULE = (1.0, 4.0, 10.0, 30.0)
"""Seconds between rounds of next pings (then the last, repeated): soon after start, when the next span's servers
are often still joining, then rarely."""
NEXT_PING_TIMEOUT = 5.0
NEXT_PING_CHANGE = 0.2
"""A round re-announces only when the set of next servers changed or a round trip moved by more than this share."""

Announce = Callable[[str, dict[str, Any]], Awaitable[object]]
"""Publish a value under a DHT key and keep it alive (the node re-announces it until withdrawn)."""
Withdraw = Callable[[str], Awaitable[object]]
"""Stop announcing under a DHT key."""
UNREAD = object()
"""A handler's `msg` when the first message is still on the stream (the handler was registered on its own)."""


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
        adapters: dict[str, Lora | None] | None = None,
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
        # server-hosted adapters (petald --adapter): name -> compute with it added (None: no weights on this span)
        self.adapters = frozenset(adapters or {})
        self._adapted = {n: AdapterCompute(self.compute, a) for n, a in (adapters or {}).items() if a is not None}
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
        kept_budget = settings.activation_budget
        kept_budget = max(self.pool.nbytes // 4, MIN_DEFAULT_BUDGET) if kept_budget is None else kept_budget
        self.activations = ActivationStore(kept_budget, peer_share=settings.peer_share)
        self.recomputed = 0  # backwards that named a kept forward no longer here (evicted, expired): recomputed
        self.jobs = Jobs(
            settings.max_queue,
            settings.request_timeout,
            name=f"petal-compute-{span.start}-{span.end}",
            max_batch_tokens=settings.max_batch_tokens,
        )
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
        self._dht = dht
        self.next_pings: dict[str, float] = {}  # next-span peer -> round trip ms, announced as the record's "np"
        self._pinger: asyncio.Task[None] | None = None
        self._np_too_big = False
        self.dispatcher: BlockDispatcher = dispatcher_for(transport)  # shared by every server on this transport
        self._protocols: dict[str, Callable[[Stream, object], Awaitable[None]]] = {
            INFO_PROTOCOL: self._handle_info,
            FORWARD_PROTOCOL: self._handle_forward,
            BACKWARD_PROTOCOL: self._handle_backward,
            INFERENCE_PROTOCOL: self._handle_inference,
        }

    # lifecycle

    @property
    def keys(self) -> list[str]:
        return [block_key(self.model, b) for b in range(self.span.start, self.span.end)]

    async def start(self) -> None:
        self.jobs.start()
        self.dispatcher.add(self)  # the block protocols' handlers route this span's requests here
        await self.publish("online")
        self._reclaimer = asyncio.create_task(self._reclaim_loop(), name="block-server-reclaim")
        if self._announce is not None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="block-server-refresh")
            if self._dht is not None and self.span.end < self.num_blocks:
                self._pinger = asyncio.create_task(self._next_ping_loop(), name="block-server-next-pings")
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
        self.dispatcher.remove(self)
        for task in (self._refresher, self._reclaimer, self._pinger):
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
        self.activations.clear()

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
            self.activations.sweep()

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
        value = ServerRecord(
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
            adapters=tuple(sorted(self.adapters)),
            next_pings=tuple(self.next_pings.items()),
        ).to_value()
        if "np" in value:
            try:
                check_announcement(block_key(self.model, self.span.end - 1), value)
            except RecordError:  # many or long addresses (relay circuits) leave no room: routers fall back
                if not self._np_too_big:
                    log.info("next pings left out of %s's record: the addresses fill the DHT entry", self.model)
                self._np_too_big = True
                del value["np"]
        return value

    async def _next_ping_loop(self) -> None:
        """Measure round trips to the servers of the next span and announce them (Petals' ``next_pings``): routers
        use them for the hops this server pushes to, which a client cannot measure itself."""
        for round_no in range(1 << 62):
            await asyncio.sleep(NEXT_PING_SCHEDULE[min(round_no, len(NEXT_PING_SCHEDULE) - 1)])
            try:
                pings = await self.measure_next_pings()
            except Exception as e:  # noqa: BLE001 - only a routing hint: the next round tries again
                log.info("measuring round trips to the next servers failed: %s", e)
                continue
            old = self.next_pings
            changed = pings.keys() != old.keys() or any(
                abs(ms - old[p]) > NEXT_PING_CHANGE * max(old[p], 1.0) for p, ms in pings.items()
            )
            self.next_pings = pings
            if changed:
                shown = ", ".join(f"{p[-6:]} {ms:.0f} ms" for p, ms in pings.items()) or "none reachable"
                log.info("round trips to the servers of block %d: %s", self.span.end, shown)
                await self.republish()

    async def measure_next_pings(self) -> dict[str, float]:
        """Round trips (ms, the best of two ``info`` calls) to up to ``MAX_NEXT_PINGS`` servers of the next span
        found in the DHT: the fastest of twice as many sampled at random."""
        assert self._dht is not None
        entries = await self._dht.get(block_key(self.model, self.span.end))
        own = getattr(self.transport, "peer_id", None)
        peers: dict[str, PeerAddr] = {}
        for entry in entries:
            record = ServerRecord.parse(entry.value, entry.peer_id)
            if record is None or record.state == OFFLINE or entry.peer_id == own:
                continue
            if record.fingerprint not in (None, self.fingerprint) or not record.start <= self.span.end < record.end:
                continue
            peers[entry.peer_id] = PeerAddr(entry.peer_id, record.direct + record.addrs)
        chosen = random.sample(sorted(peers), min(len(peers), 2 * MAX_NEXT_PINGS))

        async def ping(peer: str) -> float | None:
            best = None
            for _ in range(2):  # the first call may include dialing; the best is the round trip
                t0 = time.perf_counter()
                try:
                    await self.transport.call(peers[peer], INFO_PROTOCOL, {"model": self.model}, NEXT_PING_TIMEOUT)
                except Exception as e:  # noqa: BLE001 - an unreachable next server is simply not listed
                    log.debug("next ping to %s failed: %s", peer, e)
                    return None
                rtt = (time.perf_counter() - t0) * 1000
                best = rtt if best is None else min(best, rtt)
            return best

        results = await asyncio.gather(*(ping(p) for p in chosen))
        measured = sorted((ms, p) for p, ms in zip(chosen, results, strict=True) if ms is not None)
        return {p: round(ms, 1) for ms, p in measured[:MAX_NEXT_PINGS]}

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

    async def handle(self, protocol: str, stream: Stream, msg: object) -> None:
        """Serve a block stream whose first message `msg` the dispatcher read and routed here."""
        await self._protocols[protocol](stream, msg)

    def has_session(self, session: str) -> bool:
        """Whether `session` is an open inference session here that takes pushes."""
        return session in self._inboxes

    @property
    def push_idle_timeout(self) -> float:
        return self.settings.idle_timeout

    @staticmethod
    async def _first(stream: Stream, msg: object) -> object:
        return await stream.recv(timeout=FIRST_MESSAGE_TIMEOUT) if msg is UNREAD else msg

    async def _reply(self, stream: Stream, work: Callable[[object], Awaitable[Reply]], msg: object = UNREAD) -> None:
        """One request, one reply (sent in its wire form); every failure becomes an error frame."""
        msg = await self._first(stream, msg)
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
        assert isinstance(reply, ForwardReply)  # not asked to keep
        return decode_tensor(reply.hidden).to(hidden.dtype)

    def _compute_for(self, msg: object) -> SpanCompute:
        """The compute of the hosted adapter a validated request names (`adapter`), or the base span's."""
        name = request_adapter(msg, self.adapters) if isinstance(msg, dict) else None
        adapted = None if name is None else self._adapted.get(name)
        return self.compute if adapted is None else adapted  # type: ignore[return-value]  # same methods

    async def _handle_info(self, stream: Stream, msg: object = UNREAD) -> None:
        async def work(msg: object) -> InfoReply:
            parse_info_request(msg, self.served)
            return self.info()

        await self._reply(stream, work, msg)

    async def _handle_forward(self, stream: Stream, msg: object = UNREAD) -> None:
        async def work(msg: object) -> ForwardReply:
            req = parse_forward(msg, self.served)
            if req.keep and self.activations.budget == 0:
                req = replace(req, keep=False)
            compute = self._compute_for(msg)
            batch = forward_batch(compute, req, backward=False)  # may run concatenated with other forwards
            out = await self.jobs.run(TRAINING, compute.forward, req, batch=batch)
            if isinstance(out, KeptForward):  # keep the graph for the backward (not kept if over the peer's share)
                return replace(out.reply, activation=self.activations.put(stream.peer_id, out.kept))
            return out

        await self._reply(stream, work, msg)

    async def _handle_backward(self, stream: Stream, msg: object = UNREAD) -> None:
        async def work(msg: object) -> BackwardReply:
            req = parse_forward(msg, self.served, backward=True)
            if req.activation is not None:
                shapes = [tuple(req.hidden.shape)] + ([] if req.prompts is None else [tuple(req.prompts.shape)])
                lora = {} if req.lora is None else {k: tuple(t.shape) for k, t in req.lora.weights.items()}
                kept = self.activations.take(
                    stream.peer_id, req.activation, lambda k: k.matches(req.start, req.end, shapes, lora)
                )
                if kept is not None:
                    return await self.jobs.run(TRAINING, self.compute.backward_kept, kept, req)
                self.recomputed += 1  # gone (evicted, expired, another peer's) or another call's: run it again
            compute = self._compute_for(msg)
            batch = forward_batch(compute, req, backward=True)
            return await self.jobs.run(TRAINING, compute.backward, req, batch=batch)

        await self._reply(stream, work, msg)

    async def _handle_inference(self, stream: Stream, msg: object = UNREAD) -> None:
        """Open (reserve a cache), then serve the stream as an `InferenceSession` until it ends."""
        msg = await self._first(stream, msg)
        try:
            if not self.jobs.open or self.draining:
                raise PetalError("unavailable", "this server is shutting down; use another one")
            opened = parse_open(msg, self.served)
            compute = self._compute_for(msg)
            if opened.lora is not None:  # checked against the blocks and moved to the device once, for every step
                opened = replace(opened, lora=self.compute.session_lora(opened.lora, opened.start, opened.end))
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
            compute=compute,
            jobs=self.jobs,
            pool=self.pool,
            pusher=Pusher(
                self.transport, self.dispatcher.deliver, functools.partial(self.next_hops.resolve, opened.end)
            ),
            inbox=inbox,
            alone=lambda: len(self._live) == 1,
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

    def deliver(self, sender: str, push: PushRequest) -> None:
        """Hand a validated push to its session's inbox; raises PetalError for the pusher's error frame."""
        inbox = self._inboxes.get(push.session)
        if inbox is None:
            raise PetalError(
                "not_found",
                f"push: no inference session {push.session[:8]}… here takes pushes (it "
                "ended, or was opened without push: true)",
            )
        inbox.put(sender, push.step, push.hidden)

    def receive_push(self, sender: str, msg: object) -> dict[str, Any]:
        """The ack (or error frame) of one push frame from `sender` (the dispatcher reads the push stream)."""
        with ErrorReply(f"push from {sender}") as out:
            self.deliver(sender, parse_push(msg, self.served))
            out.reply = PushAck().to_wire()
        return out.reply
