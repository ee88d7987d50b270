"""Server-to-server push: inputs an inference session receives from the previous hop (`PushInbox`) and the stream
that sends its outputs on to the next hop (`Pusher`).

With push, hidden states travel client -> A -> B -> ... instead of back to the client between hops; the client still
gets every output (it keeps the history for failover) and decides: a step that waits for a push answers "skipped"
when the client's own copy of the input arrives first.

A server pushes only to servers of the announced chain: the client names the next hop by peer id, and `NextHops`
looks that peer up in the DHT (a server record of the same model covering the block after this hop, with the
addresses *it* announced). Addresses in the client's `push_to` are never dialed, so a client cannot make a server
connect wherever it likes; an unknown peer means no push (`pushed: false`) and the client sends the input itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import PeerAddr, Stream, ThreadSend, Transport, TransportError, thread_sender
from petal.protocol.errors import PetalError
from petal.protocol.messages import PUSH_PROTOCOL, PushRequest, PushTarget, check_pushed
from petal.protocol.records import OFFLINE, ServerRecord, block_key
from petal.protocol.replies import PushAck
from petal.protocol.tensors import decode_tensor

log = logging.getLogger("petal.server")

Sent = str
ACKED, WRITTEN, FAILED = "acked", "written", "failed"
"""What `Pusher.send` did with a push: delivered in-process, written on the stream (ack still to read), not sent."""

PUSH_WINDOW = 4
"""Pushed inputs one session buffers ahead of the step that takes them; more are refused with "busy"."""
PUSH_ACK_TIMEOUT = 10.0
"""Longest a server waits to dial the next hop or for its ack of a push before telling the client it did not push."""


class PushInbox:
    """Inputs pushed to one inference session, by step number: at most PUSH_WINDOW, only for steps not yet taken.

    A push may arrive before or after the client's step message that waits for it. While that step waits, a push
    for it is checked at once (so the pusher gets the error); one that came earlier is checked when taken.
    """

    def __init__(self, batch: int, max_length: int) -> None:
        self.batch = batch
        self.max_length = max_length
        self.last = -1  # highest step number this session has run
        self._items: dict[int, tuple[str, torch.Tensor]] = {}
        self._waiting: tuple[int, int, str] | None = None  # (step, tokens, sender) of the step now waiting
        self._event = asyncio.Event()
        self._on_arrival: Callable[[int], None] | None = None

    def expect(
        self, step: int | None, tokens: int = 0, sender: str = "", on_arrival: Callable[[int], None] | None = None
    ) -> None:
        """Announce the step now waiting (tokens and the peer whose push it takes), or None when it stops waiting.

        `on_arrival(step)` runs inside `put` as soon as that step's push is accepted, so the waiting session can
        start computing before the push is even acked (waking its task first costs ~1 ms of loop turns).
        Pushes for earlier steps can no longer be used (the client numbers its steps in order): they are dropped.
        """
        self._waiting = None if step is None else (step, tokens, sender)
        self._on_arrival = None if step is None else on_arrival
        if step is not None:
            for s in [s for s in self._items if s < step]:
                del self._items[s]

    def _check(self, sender: str, step: int, hidden: torch.Tensor) -> None:
        if self._waiting is None or self._waiting[0] != step:
            return
        _, tokens, expected = self._waiting
        if sender != expected:
            raise PetalError(
                "bad_request", f"push for step {step}: this session takes it from peer {expected}, not from {sender}"
            )
        check_pushed(hidden, self.batch, tokens)

    def put(self, sender: str, step: int, hidden: torch.Tensor) -> None:
        """Buffer a push; raises PetalError (for the pusher's error frame) if it does not fit the session."""
        if step <= self.last:
            raise PetalError("bad_request", f"push for step {step}: this session has already run step {self.last}")
        if hidden.shape[0] != self.batch or hidden.shape[1] > self.max_length:
            raise PetalError(
                "wrong_shape",
                f"push: this session takes up to [batch={self.batch}, tokens="
                f"{self.max_length}, hidden], the push is {list(hidden.shape)}",
            )
        if step in self._items:
            raise PetalError("bad_request", f"push for step {step}: this session already holds one")
        if len(self._items) >= PUSH_WINDOW:
            raise PetalError("busy", f"push: this session already buffers {PUSH_WINDOW} pushed steps")
        self._check(sender, step, hidden)
        self._items[step] = (sender, hidden)
        self._event.set()
        if self._on_arrival is not None and self._waiting is not None and self._waiting[0] == step:
            self._on_arrival(step)

    def take(self, step: int) -> torch.Tensor | None:
        """The pushed input of `step` if it is here and fits the waiting step (a misfit is dropped and logged)."""
        item = self._items.pop(step, None)
        if item is None:
            return None
        try:
            self._check(item[0], step, item[1])
        except PetalError as e:
            log.info("dropping a push that came before its step: %s", e)
            return None
        return item[1]

    def taken(self, step: int) -> None:
        """Step `step` ran (from a push or the client's own input): older and equal pushes are stale now."""
        self.last = max(self.last, step)
        for s in [s for s in self._items if s <= self.last]:
            del self._items[s]

    async def changed(self) -> None:
        """Return once a push arrived since the last call."""
        await self._event.wait()
        self._event.clear()


NEXT_HOP_TTL = 30.0
"""How long a next hop's DHT lookup (found or not) is reused before the DHT is asked again."""

Resolve = Callable[[str], Awaitable[PeerAddr | None]]
"""A push target's peer id -> how to dial it (as it announced itself), or None if it is no next hop of ours."""


class NextHops:
    """Where this server may push: servers of `model` announced in the DHT whose span holds a given block.

    Without a DHT (a server in a test, alone on an in-memory network) a peer is dialed by its id alone, which reaches
    only peers the transport already knows; in no case is an address a client supplied dialed.
    """

    def __init__(self, dht: SwarmDHT | None, model: str, fingerprint: str | None) -> None:
        self.dht = dht
        self.model = model
        self.fingerprint = fingerprint
        self._cache: dict[tuple[str, int], tuple[float, PeerAddr | None]] = {}

    async def resolve(self, block: int, peer_id: str) -> PeerAddr | None:
        """How to dial `peer_id` if it announces `model` with a span holding `block`; None otherwise."""
        if self.dht is None:
            return PeerAddr(peer_id)
        key, now = (peer_id, block), time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < NEXT_HOP_TTL:
            return cached[1]
        found: PeerAddr | None = None
        try:
            entries = await self.dht.get(block_key(self.model, block))
        except Exception as e:  # noqa: BLE001 - a failed lookup only means no push this time
            log.info("looking up next hop %s for block %d failed: %s", peer_id, block, e)
            return None
        for entry in entries:
            if entry.peer_id != peer_id:
                continue
            record = ServerRecord.parse(entry.value, entry.peer_id)
            if record is None or record.state == OFFLINE or not record.start <= block < record.end:
                continue
            if self.fingerprint is not None and record.fingerprint not in (None, self.fingerprint):
                continue
            found = PeerAddr(peer_id, record.direct + record.addrs)
            break
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[key] = (now, found)
        return found


class Pusher:
    """One session's push stream to the next hop: opened on first use, reused every step, reopened for a new peer.

    `resolve` turns the target's peer id into the addresses it announced (`NextHops.resolve` for the block after the
    session's span); a target it does not know is not pushed to.
    """

    def __init__(
        self, transport: Transport, local: Callable[[str, PushRequest], None], resolve: Resolve | None = None
    ) -> None:
        self.transport = transport
        self._local = local  # delivers pushes whose next hop is this same server
        self._resolve = resolve
        self._stream: Stream | None = None
        self._peer: PeerAddr | None = None

    def thread_sender(self, target: PushTarget) -> ThreadSend | None:
        """A sender for the compute thread when the stream to `target` is open and allows it (`thread_sender`); the
        push it sends is then acked through `push(..., sent=True)`."""
        if self._stream is None or self._peer is None or self._peer.peer_id != target.peer:
            return None
        return thread_sender(self._stream)

    async def send(self, target: PushTarget, step: int, hidden: dict[str, Any], *, sent: bool = False) -> Sent:
        """Send one step's encoded output (`sent`: the compute thread already did, see `thread_sender`): ACKED when
        delivered in-process, WRITTEN when it went out on the stream (its ack is read by `acked`, in order), FAILED
        (logged) when it could not go out.

        The session replies to its client once the push is written, before the ack: on a long link the ack is a
        round trip the client would otherwise wait for. A push that then fails its ack is reported to the client
        on the session's stream (`PushFailed`), and the client sends that hop its input itself.
        """
        try:
            if sent:
                assert self._stream is not None
                return WRITTEN
            if target.peer == self.transport.peer_id:
                self._local(target.peer, PushRequest(target.session, step, decode_tensor(hidden)))
                return ACKED
            if self._stream is None or self._peer is None or self._peer.peer_id != target.peer:
                await self.close()
                peer = await self._resolve(target.peer) if self._resolve is not None else PeerAddr(target.peer)
                if peer is None:
                    log.info("not pushing step %d to %s: it announces no span after this hop", step, target.peer)
                    return FAILED
                self._stream = await self.transport.open_stream(peer, PUSH_PROTOCOL, timeout=PUSH_ACK_TIMEOUT)
                self._peer = peer
            await self._stream.send({"session": target.session, "step": step, "hidden": hidden})
            return WRITTEN
        except PetalError as e:  # the next hop refused the push
            log.info("push of step %d to %s refused: %s", step, target.peer, e)
            return FAILED
        except (TransportError, TimeoutError, OSError) as e:
            log.info("push of step %d to %s failed: %s", step, target.peer, e)
            await self.close(reset=True)
            return FAILED

    async def acked(self, target: PushTarget, step: int) -> str | None:
        """Read the ack of the push `send` WROTE last: None once the next hop acked it, else why not (logged)."""
        try:
            if self._stream is None:
                raise TransportError("the push stream closed before the ack")
            PushAck.from_wire(await self._stream.recv(timeout=PUSH_ACK_TIMEOUT))
            return None
        except PetalError as e:  # the next hop refused the push (or sent a malformed ack: start over)
            log.info("push of step %d to %s refused: %s", step, target.peer, e)
            if e.code in ("bad_frame", "bad_tensor", "too_large"):
                await self.close()
            return f"{target.peer} refused it: {e.message}"
        except (TransportError, TimeoutError, OSError) as e:
            log.info("push of step %d to %s failed: %s", step, target.peer, e)
            await self.close(reset=True)
            return f"no ack from {target.peer}: {e}"

    async def push(self, target: PushTarget, step: int, hidden: dict[str, Any], *, sent: bool = False) -> bool:
        """`send` and then `acked`: True once the next hop acked the push, False (logged) on any failure."""
        done = await self.send(target, step, hidden, sent=sent)
        return done == ACKED or (done == WRITTEN and await self.acked(target, step) is None)

    async def close(self, reset: bool = False) -> None:
        """Close (or with `reset`, abort) the stream to the next hop, if open; idempotent."""
        stream, self._stream, self._peer = self._stream, None, None
        if stream is not None:
            with contextlib.suppress(TransportError):
                await (stream.reset() if reset else stream.close())
