"""One libp2p stream as the asyncio side sees it: ``Libp2pStream``, with its trio-side pump.

The asyncio side holds the object (``send``/``recv``/``close``/``reset``, the ``Stream`` contract of
``petal.daemon.net.transport``); ``pump()`` runs in the libp2p thread, reading yamux in large chunks, decoding
frames and handing them over one hop per chunk, and writing what ``send`` queued. Flow control: past
``HIGH_WATER`` decoded-but-unread messages the pump stops reading (yamux then pushes back on the peer).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, TypeVar

import trio

from petal.daemon.net.bridge import Bridge
from petal.daemon.net.transport import MAX_FRAME, StreamBase, StreamClosed, StreamReset, TransportError
from petal.protocol.errors import WireError
from petal.protocol.frames import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from libp2p.abc import INetStream

__all__ = ["CLOSE_GRACE", "HIGH_WATER", "LOW_WATER", "READ_CHUNK", "Libp2pStream"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_Outgoing = tuple[bytes, asyncio.Future[None]] | None
"""What the write loop takes: a frame and the future its sender awaits, or None to half-close."""

READ_CHUNK = 256 * 1024
"""Bytes asked of yamux per read: large reads mean fewer thread hops per megabyte."""
HIGH_WATER = 64
"""Decoded-but-unread messages after which a stream stops reading from the network (yamux then pushes back)."""
LOW_WATER = 16
CLOSE_GRACE = 10.0
"""After we close our side, how long the stream waits for the peer's EOF before resetting it."""


class Libp2pStream(StreamBase):
    """One libp2p stream. The asyncio side holds this object; its `pump` lives in the trio thread."""

    def __init__(self, bridge: Bridge, net_stream: INetStream, peer_id: str, protocol_id: str) -> None:
        self.peer_id = peer_id
        self.protocol_id = protocol_id
        self._bridge = bridge
        self._net = net_stream
        try:
            self.remote_addr: tuple[str, int] | None = net_stream.get_remote_address()
        except Exception:  # noqa: BLE001 - relayed or exotic connections may not have one
            self.remote_addr = None
        # asyncio side
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._end: TransportError | None = None  # StreamClosed/StreamReset once the inbound side ended
        self._closed = False  # we closed or reset our side
        self._consumed = 0
        # trio side
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[_Outgoing](math.inf)
        self._pump_scope = trio.CancelScope()
        self._delivered = 0
        self._paused: trio.Event | None = None
        self._reset_requested = False

    # -- asyncio side ------------------------------------------------------------------------------------------

    async def send(self, message: object) -> None:
        if self._closed:
            raise StreamClosed(f"the {self.protocol_id} stream to {self.peer_id} is closed for sending")
        if isinstance(self._end, StreamReset):
            raise self._end
        data = encode_frame(message)
        fut: asyncio.Future[None] = self._bridge.loop.create_future()
        self._bridge.to_trio(self._enqueue, (data, fut))
        await fut

    async def _send_raw(self, data: bytes) -> None:
        """Write bytes that are not a frame (tests use it to check how peers treat garbage)."""
        fut: asyncio.Future[None] = self._bridge.loop.create_future()
        self._bridge.to_trio(self._enqueue, (data, fut))
        await fut

    async def recv(self, timeout: float | None = None) -> object:
        if self._end is not None and (self._inbox.empty() or self._reset_requested):
            raise self._end
        item = await self._next_item(timeout)
        if isinstance(item, TransportError):
            self._end = item
            raise item
        self._consumed += 1
        if self._paused is not None and self._delivered - self._consumed <= LOW_WATER:
            self._bridge.to_trio_quiet(self._resume)
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bridge.to_trio_quiet(self._enqueue, None)

    async def reset(self) -> None:
        if self._closed and self._reset_requested:
            return
        self._closed = True
        self._reset_requested = True
        if self._end is None:
            self._end = StreamReset(f"the {self.protocol_id} stream to {self.peer_id} was reset by us")
        self._bridge.to_trio_quiet(self._pump_scope.cancel)

    def _on_inbound(self, items: list[object]) -> None:
        for item in items:
            self._inbox.put_nowait(item)

    # -- trio side ---------------------------------------------------------------------------------------------

    def _enqueue(self, item: _Outgoing) -> None:
        """Queue an outgoing item for the write loop. Once the pump has ended (the stream was reset, e.g. by a
        malformed frame, before the asyncio side noticed), fail a data item's sender instead of raising here:
        an exception in a trio callback would end the whole libp2p thread."""
        try:
            self._outbox_send.send_nowait(item)
        except trio.ClosedResourceError:
            if item is not None:
                reset = StreamReset(f"cannot send on {self.protocol_id} to {self.peer_id}: the stream was reset")
                self._bridge.to_asyncio(_settle, item[1], reset)

    def _resume(self) -> None:
        if self._paused is not None:
            self._paused.set()

    def _deliver(self, items: list[object]) -> None:
        self._delivered += sum(1 for i in items if not isinstance(i, TransportError))
        self._bridge.to_asyncio(self._on_inbound, items)

    async def _read_loop(self) -> None:
        from libp2p.network.stream.exceptions import StreamEOF

        decoder = FrameDecoder(MAX_FRAME)
        try:
            while True:
                data = await self._net.read(READ_CHUNK)
                if not data:
                    raise StreamEOF()
                messages = decoder.feed(data)
                if messages:
                    self._deliver(messages)
                    decoder.feed(b"")  # a bad frame behind good ones in the same chunk raises only now
                if self._delivered - self._consumed > HIGH_WATER:
                    self._paused = trio.Event()
                    if self._delivered - self._consumed > LOW_WATER:  # recheck: recv may have drained meanwhile
                        await self._paused.wait()
                    self._paused = None
        except StreamEOF:
            try:
                decoder.eof()
            except WireError as e:
                log.warning(
                    "malformed frame on %s from %s: %s; resetting the stream", self.protocol_id, self.peer_id, e
                )
                self._deliver([StreamReset(f"malformed frame on {self.protocol_id} from {self.peer_id}: {e}")])
                self._reset_requested = True
                return
            # yamux drops a stream's bookkeeping when a RST arrives, so a reset often surfaces as EOF here;
            # its own flag still tells the two apart.
            if getattr(getattr(self._net, "muxed_stream", None), "reset_received", False):
                self._deliver([StreamReset(f"peer {self.peer_id} reset the {self.protocol_id} stream")])
            else:
                self._deliver([StreamClosed(f"peer {self.peer_id} closed the {self.protocol_id} stream")])
        except WireError as e:
            log.warning("malformed frame on %s from %s: %s; resetting the stream", self.protocol_id, self.peer_id, e)
            self._deliver([StreamReset(f"malformed frame on {self.protocol_id} from {self.peer_id}: {e}")])
            self._reset_requested = True
            self._pump_scope.cancel()
        except Exception as e:  # noqa: BLE001 - StreamReset, connection closed, ...: all end the stream
            self._deliver(
                [StreamReset(f"the {self.protocol_id} stream from {self.peer_id} was reset ({type(e).__name__}: {e})")]
            )
            self._reset_requested = True

    async def _write_loop(self) -> None:
        async for item in self._outbox_recv:
            if item is None:
                try:
                    await self._close_write()
                except Exception as e:  # noqa: BLE001 - the stream ends either way; the reader sees how
                    log.debug("close_write on %s to %s failed: %s", self.protocol_id, self.peer_id, e)
                return
            data, fut = item
            try:
                await self._net.write(data)
            except Exception as e:  # noqa: BLE001 - reported to the sender
                err = StreamReset(
                    f"cannot send on {self.protocol_id} to {self.peer_id}: the stream was reset ({type(e).__name__})"
                )
                self._bridge.to_asyncio(_settle, fut, err)
                self._reset_requested = True
            else:
                self._bridge.to_asyncio(_settle, fut, None)

    async def _close_write(self) -> None:
        """Half-close: libp2p's NetStream has it, though its interface (INetStream) does not declare it."""
        from libp2p.network.stream.net_stream import NetStream

        if not isinstance(self._net, NetStream):
            raise TransportError(f"{type(self._net).__name__} cannot half-close")
        await self._net.close_write()

    def abort(self) -> None:
        """Trio side: end the pump and reset the stream (a stream nobody will use, or one without a handler)."""
        self._reset_requested = True
        self._pump_scope.cancel()

    async def pump(self) -> None:
        """The stream's whole trio life: read and write until both sides closed, or reset."""
        reader_done = trio.Event()

        async def reader() -> None:
            try:
                await self._read_loop()
            finally:
                reader_done.set()

        try:
            with self._pump_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    await self._write_loop()
                    with trio.move_on_after(CLOSE_GRACE) as grace:
                        await reader_done.wait()
                    if grace.cancelled_caught:
                        self._reset_requested = True
                    nursery.cancel_scope.cancel()
        finally:
            if not reader_done.is_set():
                self._deliver([StreamReset(f"the {self.protocol_id} stream to {self.peer_id} was reset")])
            self._outbox_send.close()
            for item in _drain(self._outbox_recv):
                if item is not None:
                    self._bridge.to_asyncio(
                        _settle, item[1], StreamReset(f"the {self.protocol_id} stream to {self.peer_id} was reset")
                    )
            with trio.CancelScope(shield=True):
                try:
                    if self._reset_requested or self._pump_scope.cancelled_caught:
                        await self._net.reset()
                    else:
                        await self._net.close()
                except Exception as e:  # noqa: BLE001 - closing what is already broken; nothing to hand on
                    log.debug("closing %s stream to %s: %s", self.protocol_id, self.peer_id, e)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _drain(channel: trio.MemoryReceiveChannel[T]) -> list[T]:
    items = []
    while True:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return items
