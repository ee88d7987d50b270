"""The transport interface the daemon talks to, and an in-memory twin of it for tests of higher layers.

Streams carry msgpack-able objects as length-prefixed frames (`petal.protocol.frames`). The in-memory
implementation encodes and decodes every message too, so that code tested against it sees the same
errors (an object that is not msgpack-able fails at `send`, a malformed frame resets the stream) as it
would over libp2p (`petal.daemon.net.p2p.Libp2pTransport`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from petal.protocol.errors import WireError
from petal.protocol.frames import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

log = logging.getLogger(__name__)

MAX_FRAME = DEFAULT_MAX_FRAME
"""Largest frame a stream accepts (64 MiB): bigger than any activation batch we send, small enough to bound memory."""


class TransportError(Exception):
    """Base class of everything the transport raises (besides TimeoutError)."""


class StreamClosed(TransportError):
    """The peer closed its side of the stream cleanly; no more messages will come (or we closed ours)."""


class StreamReset(TransportError):
    """The stream was aborted: the peer's handler failed, a frame was malformed, or the connection dropped."""


class DialError(TransportError):
    """No connection could be made to the peer (wrong address, peer down, transport stopped)."""


class ProtocolNotSupported(TransportError):
    """The peer is reachable but serves no handler for the requested protocol id."""


@dataclass(frozen=True)
class PeerAddr:
    """How to reach a peer."""

    peer_id: str  # base58 libp2p peer id
    addrs: tuple[str, ...] = ()  # multiaddrs, e.g. "/ip4/127.0.0.1/tcp/4001" (with or without /p2p/<id>)


@runtime_checkable
class Stream(Protocol):
    """One bidirectional stream of messages (msgpack-able objects), asyncio side."""

    peer_id: str
    protocol_id: str

    async def send(self, message: object) -> None: ...

    async def recv(self, timeout: float | None = None) -> object:
        """Next message; raises StreamClosed at clean EOF, StreamReset on abort, TimeoutError on timeout."""
        ...

    async def close(self) -> None:
        """Half-close gracefully (the peer reads EOF after our last message). Idempotent."""
        ...

    async def reset(self) -> None:
        """Abort the stream in both directions; the peer's recv/send raise StreamReset. Idempotent."""
        ...

    async def __aenter__(self) -> Stream: ...

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None: ...


Handler = Callable[[Stream], Awaitable[None]]

ThreadSend = Callable[[object], None]
"""Sends one message on a stream from the compute thread, or from the loop's own thread (see `thread_sender`)."""


def thread_sender(stream: Stream) -> ThreadSend | None:
    """A function that sends messages on `stream` from another thread (the compute worker), or None when this kind
    of stream cannot. Call on the event loop. The sending thread encodes the frame; the loop only writes it, in one
    callback, so a result goes out without waking the task that waits for it; called on the loop's thread itself
    (a step run inline), it writes at once. A message sent after the stream ended is dropped (the stream's task sees
    the end itself)."""
    make: Callable[[], ThreadSend] | None = getattr(stream, "thread_sender", None)
    return make() if make is not None else None


@runtime_checkable
class Transport(Protocol):
    peer_id: str
    listen_addrs: list[str]  # full multiaddrs others can dial (with /p2p/<id>)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def set_handler(self, protocol_id: str, handler: Handler) -> None: ...

    async def open_stream(self, peer: PeerAddr, protocol_id: str, timeout: float = 10.0) -> Stream: ...

    async def call(self, peer: PeerAddr, protocol_id: str, request: object, timeout: float = 30.0) -> object: ...


class StreamBase:
    """Shared by both stream kinds: the timed inbox read, and `async with` that closes cleanly on success and
    resets when the block raised. Subclasses set `peer_id`, `protocol_id` and `_inbox` (an asyncio.Queue)."""

    peer_id: str
    protocol_id: str
    _inbox: asyncio.Queue[object]

    async def _next_item(self, timeout: float | None) -> object:
        """The next inbox item, or TimeoutError naming the protocol and peer after `timeout` seconds."""
        if timeout is None:
            return await self._inbox.get()
        try:
            return await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no message on {self.protocol_id} from {self.peer_id} within {timeout}s") from None

    async def close(self) -> None:
        raise NotImplementedError

    async def reset(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.reset()


async def call_over(transport: Transport, peer: PeerAddr, protocol_id: str, request: object, timeout: float) -> object:
    """One request frame, one response frame on a fresh stream; the whole exchange bounded by `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            stream = await transport.open_stream(peer, protocol_id, timeout=timeout)
            async with stream:
                await stream.send(request)
                try:
                    return await stream.recv()
                except StreamClosed:
                    raise StreamClosed(
                        f"peer {peer.peer_id} closed the {protocol_id} stream without answering"
                    ) from None
    except TimeoutError:
        raise TimeoutError(f"{protocol_id} call to peer {peer.peer_id} got no answer within {timeout}s") from None


async def serve_stream(stream: Stream, handler: Handler) -> None:
    """Run a handler on an inbound stream: a handler that raises resets the stream, never the transport."""
    try:
        await handler(stream)
    except asyncio.CancelledError:
        await stream.reset()
        raise
    except TransportError as e:  # the peer went away or misbehaved: routine, no traceback
        log.info("handler for %s from %s ended: %s", stream.protocol_id, stream.peer_id, e)
        await stream.reset()
    except Exception:
        log.exception("handler for %s from %s failed; resetting the stream", stream.protocol_id, stream.peer_id)
        await stream.reset()
    else:
        await stream.close()


# ---------------------------------------------------------------------------------------------------------------------
# In-memory implementation

_EOF = object()


class MemoryNetwork:
    """A shared switchboard: MemoryTransports started on the same network can reach each other by peer id."""

    def __init__(self) -> None:
        self.transports: dict[str, MemoryTransport] = {}


class MemoryStream(StreamBase):
    """One end of an in-memory stream. Messages go through real frame encoding and decoding."""

    def __init__(self, peer_id: str, protocol_id: str, max_frame: int = MAX_FRAME) -> None:
        self.peer_id = peer_id
        self.protocol_id = protocol_id
        self.other: MemoryStream | None = None
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._decoder = FrameDecoder(max_frame)
        self._write_closed = False
        self._reset: StreamReset | None = None

    async def send(self, message: object) -> None:
        if self._reset is not None:
            raise self._reset
        if self._write_closed:
            raise StreamClosed(f"stream {self.protocol_id} to {self.peer_id} is closed for sending")
        self._send_bytes(encode_frame(message))
        await asyncio.sleep(0)  # a real transport yields on every write; so do we, to surface ordering bugs

    async def _send_raw(self, data: bytes) -> None:
        """Write bytes that are not a frame (tests use it to check how peers treat garbage)."""
        self._send_bytes(data)

    def _send_bytes(self, data: bytes) -> None:
        assert self.other is not None
        self.other._receive_bytes(data)

    def _receive_bytes(self, data: bytes) -> None:
        if self._reset is not None:
            return
        try:
            messages = self._decoder.feed(data)
        except WireError as e:
            self._malformed(e)
            return
        for m in messages:
            self._inbox.put_nowait(m)
        if messages:
            try:
                self._decoder.feed(b"")  # surfaces a bad frame that followed the good ones
            except WireError as e:
                self._malformed(e)

    def _malformed(self, e: WireError) -> None:
        log.warning("malformed frame on %s from %s: %s; resetting the stream", self.protocol_id, self.peer_id, e)
        self._abort(StreamReset(f"malformed frame on {self.protocol_id} from {self.peer_id}: {e}"))
        assert self.other is not None
        self.other._abort(StreamReset(f"peer {self.other.peer_id} reset the {self.protocol_id} stream"))

    async def recv(self, timeout: float | None = None) -> object:
        item = await self._next_item(timeout)
        if item is _EOF:
            self._inbox.put_nowait(item)  # every later recv sees the same end
            raise StreamClosed(f"peer {self.peer_id} closed the {self.protocol_id} stream")
        if isinstance(item, StreamReset):
            self._inbox.put_nowait(item)
            raise item
        return item

    async def close(self) -> None:
        if self._write_closed or self._reset is not None:
            return
        self._write_closed = True
        assert self.other is not None
        if self.other._reset is None:
            self.other._inbox.put_nowait(_EOF)

    async def reset(self) -> None:
        if self._reset is not None:
            return
        self._abort(StreamReset(f"the {self.protocol_id} stream to {self.peer_id} was reset by us"))
        assert self.other is not None
        self.other._abort(StreamReset(f"peer {self.other.peer_id} reset the {self.protocol_id} stream"))

    def _abort(self, error: StreamReset) -> None:
        if self._reset is None:
            self._reset = error
            self._write_closed = True
            self._inbox.put_nowait(error)


def memory_stream_pair(a: str, b: str, protocol_id: str) -> tuple[MemoryStream, MemoryStream]:
    """Two connected stream ends: the first as seen by peer `a` (talking to b), the second by `b`."""
    sa, sb = MemoryStream(b, protocol_id), MemoryStream(a, protocol_id)
    sa.other, sb.other = sb, sa
    return sa, sb


class MemoryTransport:
    """Same contract as Libp2pTransport, in one event loop, for fast tests of the layers above."""

    def __init__(self, network: MemoryNetwork, peer_id: str) -> None:
        self.network = network
        self.peer_id = peer_id
        self.listen_addrs: list[str] = [f"/memory/{peer_id}/p2p/{peer_id}"]
        self._handlers: dict[str, Handler] = {}
        self._streams: weakref.WeakSet[MemoryStream] = weakref.WeakSet()  # open ones, reset on stop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False

    async def start(self) -> None:
        if self.peer_id in self.network.transports:
            raise TransportError(f"peer id {self.peer_id} is already started on this MemoryNetwork")
        self.network.transports[self.peer_id] = self
        self._running = True

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self.network.transports.pop(self.peer_id, None)
        for s in list(self._streams):
            s._abort(StreamReset(f"transport of {self.peer_id} stopped"))
            if s.other is not None:
                s.other._abort(StreamReset(f"connection to {self.peer_id} closed: the peer went away"))
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._streams.clear()

    def set_handler(self, protocol_id: str, handler: Handler) -> None:
        self._handlers[protocol_id] = handler

    async def open_stream(self, peer: PeerAddr, protocol_id: str, timeout: float = 10.0) -> Stream:
        if not self._running:
            raise DialError(f"transport of {self.peer_id} is not running: call start() first")
        await asyncio.sleep(0)  # dialing yields (and can be cancelled) in the real transport too
        remote = self.network.transports.get(peer.peer_id)
        if remote is None:
            raise DialError(f"cannot reach peer {peer.peer_id}: it is not on this MemoryNetwork (stopped?)")
        handler = remote._handlers.get(protocol_id)
        if handler is None:
            raise ProtocolNotSupported(f"peer {peer.peer_id} does not serve protocol {protocol_id}")
        mine, theirs = memory_stream_pair(self.peer_id, peer.peer_id, protocol_id)
        self._streams.add(mine)
        remote._streams.add(theirs)
        remote._spawn(serve_stream(theirs, handler), theirs)
        return mine

    def _spawn(self, coro: Awaitable[None], stream: MemoryStream) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._streams.discard(stream)

        task.add_done_callback(done)

    async def call(self, peer: PeerAddr, protocol_id: str, request: object, timeout: float = 30.0) -> object:
        return await call_over(self, peer, protocol_id, request, timeout)
