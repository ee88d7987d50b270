"""The libp2p transport: py-libp2p (trio-native) runs in its own thread; a thin bridge gives asyncio the
`Transport` interface of `petal.daemon.net.transport`.

Why the bridge looks like this: per-message `trio.from_thread.run` from executor threads costs far more than
the network itself. Both directions here are non-blocking hand-offs instead: asyncio -> trio through
`TrioToken.run_sync_soon` (which spawns a task or feeds a per-stream trio channel), trio -> asyncio through
`loop.call_soon_threadsafe` (resolving a future or feeding the stream's asyncio queue, one hop per read
chunk, not per message). Cancelling an asyncio awaiter cancels the trio operation it waits for.

Security is Noise only and muxing yamux only (never mplex); one connection per peer, reused by every stream.

Circuit relay v2 (libp2p's own implementation, wired by hand because 0.8.1 does not plug it into the swarm): every
transport accepts relayed connections (STOP); one started with `relay_service=True` also relays for others
(HOP, within `RELAY_LIMITS`); `use_relay(relay)` reserves a slot and returns the circuit address to announce;
`open_stream` dials `/.../p2p/RELAY/p2p-circuit/p2p/PEER` addresses through the relay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from petal.daemon.identity import Identity
from petal.daemon.net.transport import (
    MAX_FRAME,
    DialError,
    Handler,
    PeerAddr,
    ProtocolNotSupported,
    StreamBase,
    StreamClosed,
    StreamReset,
    TransportError,
    call_over,
    serve_stream,
)
from petal.protocol.errors import WireError
from petal.protocol.frames import FrameDecoder, encode_frame

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetStream

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_CHUNK = 256 * 1024
"""Bytes asked of yamux per read: large reads mean fewer thread hops per megabyte."""
HIGH_WATER = 64
"""Decoded-but-unread messages after which a stream stops reading from the network (yamux then pushes back)."""
LOW_WATER = 16
CLOSE_GRACE = 10.0
"""After we close our side, how long the stream waits for the peer's EOF before resetting it."""


def build_host(identity: Identity, listen: Sequence[str]) -> IHost:
    """A libp2p host with Noise + yamux only and at most one connection per peer.

    `max_connections_per_peer=1` matters beyond resource use: with the default (3) every dial to a connected
    peer waits ~250 ms for extra connections.
    """
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    key_pair = identity.libp2p_key_pair()
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: noise},
        muxer_opt={YAMUX_ID: Yamux},
        listen_addrs=[multiaddr.Multiaddr(a) for a in listen],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    # libp2p's AutoConnector keeps dialing every peer in the peerstore until ~100 connections are open. Our
    # router decides whom to talk to, so it stays off (its start() is what arms it).
    connector = host.get_network().auto_connector  # type: ignore[attr-defined]

    async def _off() -> None:
        return None

    connector.start = _off
    connector.stop = _off
    return host


RELAY_LIMITS = dict(duration=3600, data=1 << 30, max_circuit_conns=8, max_reservations=16)
"""What a relaying daemon grants: per circuit at most an hour and 1 GiB, 8 circuits per reserved peer, 16 peers.
A circuit that hits a limit is reset; the next `open_stream` dials a fresh one."""
DIRECT_FIRST_TIMEOUT = 3.0
"""When a peer has both direct and circuit addresses, how long the direct dial may take before we use the relay."""


class RelayError(DialError):
    """A relay refused us: it offers no relay service, has no room, or the target holds no reservation on it."""


class _RelayStreamEndFilter(logging.Filter):
    """libp2p 0.8.1's relay logs each ordinary end of a hop or circuit stream (EOF, reset) at ERROR, and a
    first dial to a peer it has no addresses for at WARNING; drop those so that real relay failures stand out."""

    BENIGN = ("stream is reset", "peer ID not found", "stream is closed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().rstrip()
        return not (message.endswith(":") or any(b in message for b in self.BENIGN))


_RELAY_FILTER = _RelayStreamEndFilter()
for _name in ("libp2p.relay.circuit_v2.protocol", "libp2p.relay.circuit_v2.transport"):
    logging.getLogger(_name).addFilter(_RELAY_FILTER)


def is_circuit(addr: str) -> bool:
    """Whether `addr` is a relayed address (`.../p2p/RELAY/p2p-circuit/p2p/PEER`)."""
    return "/p2p-circuit" in addr


def _strip_p2p(addr: str) -> str:
    """The transport part of a multiaddr ("/ip4/1.2.3.4/tcp/5/p2p/Qm.." -> "/ip4/1.2.3.4/tcp/5")."""
    i = addr.find("/p2p/")
    return addr if i < 0 else addr[:i]


class _Bridge:
    """The two hand-offs between the asyncio loop and the trio thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None

    def to_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Run the sync `fn(*args)` soon in the trio thread (FIFO with other calls); never blocks."""
        if self.token is None:
            raise TransportError("the libp2p transport is not running: call start() first")
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise TransportError("the libp2p transport has stopped") from None

    def to_asyncio(self, fn: Callable[..., object], *args: object) -> None:
        """Run the sync `fn(*args)` soon in the asyncio loop; a closed loop means nobody is listening."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    def run(
        self, fn: Callable[..., Awaitable[T]], *args: object, discard: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """Run the trio coroutine `fn(*args)` as a task of the transport's nursery; the future gets its outcome.

        Cancelling the future cancels the trio task. If the task produced a result nobody will take (the
        future was cancelled meanwhile), `discard(result)` runs in the trio thread so nothing leaks.
        """
        fut: asyncio.Future[T] = self.loop.create_future()
        scope = trio.CancelScope()

        def deliver(ok: bool, value: Any) -> None:
            if fut.done():
                if ok and discard is not None:
                    self.to_trio_quiet(discard, value)
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        async def task() -> None:
            delivered = False
            try:
                with scope:
                    try:
                        value = await fn(*args)
                    except Exception as e:  # noqa: BLE001 - handed to the asyncio side
                        self.to_asyncio(deliver, False, e)
                    else:
                        self.to_asyncio(deliver, True, value)
                    delivered = True
            finally:
                if not delivered:
                    self.to_asyncio(deliver, False, TransportError("the operation was cancelled (transport stopping)"))

        def spawn() -> None:
            if self.nursery is None:
                self.to_asyncio(deliver, False, TransportError("the libp2p transport has stopped"))
            else:
                self.nursery.start_soon(task)

        self.to_trio(spawn)
        fut.add_done_callback(lambda f: f.cancelled() and self.to_trio_quiet(scope.cancel))
        return fut

    def to_trio_quiet(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self.to_trio(fn, *args)
        except TransportError:
            pass


class Libp2pStream(StreamBase):
    """One libp2p stream. The asyncio side holds this object; its `_run` pump lives in the trio thread."""

    def __init__(self, bridge: _Bridge, net_stream: INetStream, peer_id: str, protocol_id: str) -> None:
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
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[tuple[Any, ...]](math.inf)
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
        self._bridge.to_trio(self._enqueue, ("data", data, fut))
        await fut

    async def _send_raw(self, data: bytes) -> None:
        """Write bytes that are not a frame (tests use it to check how peers treat garbage)."""
        fut: asyncio.Future[None] = self._bridge.loop.create_future()
        self._bridge.to_trio(self._enqueue, ("data", data, fut))
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
        self._bridge.to_trio_quiet(self._enqueue, ("close",))

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

    def _enqueue(self, item: tuple[Any, ...]) -> None:
        """Queue an outgoing item for the write loop. Once the pump has ended (the stream was reset, e.g. by a
        malformed frame, before the asyncio side noticed), fail a data item's sender instead of raising here:
        an exception in a trio callback would end the whole libp2p thread."""
        try:
            self._outbox_send.send_nowait(item)
        except trio.ClosedResourceError:
            if item[0] == "data":
                reset = StreamReset(f"cannot send on {self.protocol_id} to {self.peer_id}: the stream was reset")
                self._bridge.to_asyncio(_settle, item[2], reset)

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
            if getattr(self._net.muxed_stream, "reset_received", False):
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
            if item[0] == "close":
                try:
                    await self._net.close_write()
                except Exception as e:  # noqa: BLE001
                    log.debug("close_write on %s to %s failed: %s", self.protocol_id, self.peer_id, e)
                return
            _, data, fut = item
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

    async def _run(self) -> None:
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
                if item[0] == "data":
                    self._bridge.to_asyncio(
                        _settle, item[2], StreamReset(f"the {self.protocol_id} stream to {self.peer_id} was reset")
                    )
            with trio.CancelScope(shield=True):
                try:
                    if self._reset_requested or self._pump_scope.cancelled_caught:
                        await self._net.reset()
                    else:
                        await self._net.close()
                except Exception as e:  # noqa: BLE001
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


class Libp2pTransport:
    """`Transport` over py-libp2p (TCP, Noise, yamux). Construct, `await start()`, use, `await stop()`."""

    def __init__(
        self, identity: Identity, listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",), relay_service: bool = False
    ) -> None:
        self.identity = identity
        self.relay_service = relay_service
        self.circuit_addrs: list[str] = []  # also appended to listen_addrs: what others dial through relays
        self._relay_proto: Any = None  # libp2p CircuitV2Protocol (trio side)
        self._relay_transport: Any = None  # libp2p CircuitV2Transport (trio side)
        self.peer_id = identity.peer_id
        self.listen_addrs: list[str] = []
        self._listen = tuple(listen)
        self._handlers: dict[str, Handler] = {}
        self._bridge: _Bridge | None = None
        self._host: IHost | None = None
        self._thread: threading.Thread | None = None
        self._stop_event: trio.Event | None = None
        self._finished: asyncio.Future[None] | None = None
        self._handler_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the trio thread and listen; returns once `listen_addrs` is known (raises if listening failed)."""
        if self._thread is not None:
            raise TransportError("this Libp2pTransport was already started; create a new one")
        loop = asyncio.get_running_loop()
        self._bridge = _Bridge(loop)
        started: asyncio.Future[list[str]] = loop.create_future()
        self._finished = loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(started,), name=f"petal-libp2p-{self.peer_id[-6:]}", daemon=True
        )
        self._thread.start()
        try:
            self.listen_addrs = await started
        except BaseException:
            await self.stop()
            raise

    def _thread_main(self, started: asyncio.Future[list[str]]) -> None:
        bridge = self._bridge
        assert bridge is not None and self._finished is not None
        error: BaseException | None = None
        try:
            trio.run(self._trio_main, started)
        except BaseException as e:
            error = e
            log.exception("the libp2p thread failed")
        finally:
            bridge.token = None
            bridge.nursery = None

            def finish() -> None:
                if not started.done():
                    started.set_exception(
                        TransportError(f"libp2p failed to start listening on {list(self._listen)}: {error!r}")
                    )
                assert self._finished is not None
                if not self._finished.done():
                    self._finished.set_result(None)

            bridge.to_asyncio(finish)

    async def _trio_main(self, started: asyncio.Future[list[str]]) -> None:
        import multiaddr

        bridge = self._bridge
        assert bridge is not None
        self._stop_event = trio.Event()
        host = build_host(self.identity, self._listen)
        self._host = host
        for protocol_id in self._handlers:
            self._register(protocol_id)
        async with host.run([multiaddr.Multiaddr(a) for a in self._listen]), self._relay_running(host):
            async with trio.open_nursery() as nursery:
                bridge.nursery = nursery
                bridge.token = trio.lowlevel.current_trio_token()
                addrs = [str(a) for a in host.get_addrs()]
                bridge.to_asyncio(lambda: started.done() or started.set_result(addrs))
                await self._stop_event.wait()
                bridge.nursery = None
                nursery.cancel_scope.cancel()
            await host.close()

    def _relay_running(self, host: IHost) -> Any:
        """Run libp2p's circuit relay v2 service on `host`: STOP always (we accept relayed connections), HOP
        (relaying for others) when `relay_service` is set."""
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.resources import RelayLimits
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport
        from libp2p.tools.anyio_service import background_trio_service

        limits = RelayLimits(**RELAY_LIMITS)
        self._relay_proto = CircuitV2Protocol(host, limits=limits, allow_hop=self.relay_service)
        # Role STOP only: with CLIENT, every dial through a relay would first reserve a slot there too.
        self._relay_transport = CircuitV2Transport(
            host, self._relay_proto, RelayConfig(roles=RelayRole.STOP, limits=limits)
        )
        return background_trio_service(self._relay_proto)

    async def stop(self) -> None:
        """Cancel handlers, close every stream and connection, and join the trio thread."""
        for task in list(self._handler_tasks):
            task.cancel()
        await asyncio.gather(*self._handler_tasks, return_exceptions=True)
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._bridge is not None and self._stop_event is not None:
            self._bridge.to_trio_quiet(self._stop_event.set)
        if self._finished is not None:
            await self._finished
        thread.join()
        self._thread = None

    # -- handlers ----------------------------------------------------------------------------------------------

    def set_handler(self, protocol_id: str, handler: Handler) -> None:
        """Serve `protocol_id`: each inbound stream runs `handler(stream)` as an asyncio task."""
        self._handlers[protocol_id] = handler
        if self._bridge is not None and self._bridge.token is not None:
            self._bridge.to_trio(self._register, protocol_id)

    def _register(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        assert self._host is not None

        async def on_stream(net_stream: INetStream) -> None:
            # Runs in libp2p's connection nursery: it must never raise, or the whole connection goes down.
            try:
                peer_id = str(net_stream.muxed_conn.peer_id)
                stream = Libp2pStream(self._bridge, net_stream, peer_id, protocol_id)  # type: ignore[arg-type]
                assert self._bridge is not None
                self._bridge.to_asyncio(self._start_handler, stream)
                await stream._run()
            except Exception:
                log.exception("inbound %s stream failed", protocol_id)

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    def _start_handler(self, stream: Libp2pStream) -> None:
        handler = self._handlers.get(stream.protocol_id)
        if handler is None:
            self._bridge.to_trio_quiet(stream._pump_scope.cancel)  # type: ignore[union-attr]
            return
        task = asyncio.get_running_loop().create_task(serve_stream(stream, handler))
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)

    # -- outbound ----------------------------------------------------------------------------------------------

    async def open_stream(self, peer: PeerAddr, protocol_id: str, timeout: float = 10.0) -> Libp2pStream:
        """Open a stream, dialing the peer first if we hold no connection to it."""
        if self._bridge is None or self._bridge.token is None:
            raise DialError("the libp2p transport is not running: call start() first")

        def discard(stream: Libp2pStream) -> None:
            stream._reset_requested = True
            stream._pump_scope.cancel()

        return await self._bridge.run(self._open, peer, protocol_id, timeout, discard=discard)

    async def _open(self, peer: PeerAddr, protocol_id: str, timeout: float) -> Libp2pStream:
        import multiaddr
        from libp2p.custom_types import TProtocol

        host, bridge = self._host, self._bridge
        assert host is not None and bridge is not None and bridge.nursery is not None
        pid = _parse_peer_id(peer.peer_id)
        try:
            addrs = [multiaddr.Multiaddr(_strip_p2p(a)) for a in peer.addrs if not is_circuit(a)]
            circuits = [multiaddr.Multiaddr(a) for a in peer.addrs if is_circuit(a)]
        except Exception as e:  # noqa: BLE001
            raise DialError(f"bad multiaddr in {peer.addrs}: {e}") from None
        try:
            with trio.fail_after(timeout):
                await self._connect(pid, addrs, circuits, peer)
                try:
                    net_stream = await host.new_stream(pid, [TProtocol(protocol_id)])
                except Exception as e:  # noqa: BLE001
                    cause = e.__cause__ or e
                    if "protocol" in str(cause).lower() or "multiselect" in type(cause).__name__.lower():
                        raise ProtocolNotSupported(
                            f"peer {peer.peer_id} does not serve protocol {protocol_id} ({cause})"
                        ) from None
                    raise DialError(f"cannot open a {protocol_id} stream to {peer.peer_id}: {e}") from None
        except trio.TooSlowError:
            raise TimeoutError(
                f"opening a {protocol_id} stream to {peer.peer_id} took longer than {timeout}s"
            ) from None
        stream = Libp2pStream(bridge, net_stream, peer.peer_id, protocol_id)
        bridge.nursery.start_soon(stream._run)
        return stream

    async def _connect(self, pid: Any, addrs: list[Any], circuits: list[Any], peer: PeerAddr) -> None:
        """Reuse a connection to `pid`, else dial direct addresses (briefly, if a relay is the fallback), then
        circuits."""
        from libp2p.peer.peerinfo import PeerInfo

        host = self._host
        assert host is not None
        if host.get_network().connections.get(pid):
            return
        errors: list[str] = []
        if addrs:
            try:
                if circuits:
                    with trio.fail_after(DIRECT_FIRST_TIMEOUT):
                        await host.connect(PeerInfo(pid, addrs))
                else:
                    await host.connect(PeerInfo(pid, addrs))
                return
            except (Exception, trio.TooSlowError) as e:  # noqa: BLE001
                errors.append(f"direct: {e or type(e).__name__}")
        for circuit in circuits:
            try:
                await self._dial_circuit(circuit)
                return
            except RelayError as e:
                errors.append(str(e))
        if not errors:
            raise DialError(f"no address to dial peer {peer.peer_id}: pass its multiaddrs in PeerAddr.addrs")
        raise (RelayError if circuits and not addrs else DialError)(
            f"cannot reach peer {peer.peer_id} at {list(peer.addrs)}: {'; '.join(errors)}"
        )

    async def _dial_circuit(self, circuit: Any) -> None:
        """Connect through the relay named in `circuit`; the relayed connection joins the swarm like any other."""
        try:
            await self._relay_transport.dial(circuit)
        except Exception as e:  # noqa: BLE001 - libp2p raises ConnectionError/RelayConnectionError/SwarmException
            text = str(e)
            if "NO_RESERVATION" in text or "status 204" in text:
                hint = "the peer holds no reservation on that relay (it may have restarted or moved: look it up again)"
            elif "protocol" in text.lower() or "multiselect" in text.lower() or "negotiat" in text.lower():
                hint = "that peer offers no relay service (it runs with --no-relay or is not reachable itself)"
            else:
                hint = text
            raise RelayError(f"relaying through {circuit} failed: {hint}") from None

    async def use_relay(self, relay: PeerAddr, timeout: float = 15.0) -> str:
        """Reserve a slot on `relay` (a peer started with relay_service) and return our circuit address through it,
        `<relay addr>/p2p/RELAY/p2p-circuit/p2p/US`, also appended to `listen_addrs` and `circuit_addrs`.

        For daemons that others cannot dial: peers reach us through the relay instead. libp2p refreshes the
        reservation before it expires for as long as the transport runs."""
        if self._bridge is None or self._bridge.token is None:
            raise TransportError("the libp2p transport is not running: call start() first")
        direct = [a for a in relay.addrs if not is_circuit(a)]
        if not direct:
            raise RelayError(
                f"relay {relay.peer_id} needs a direct address (relays cannot be chained): got {relay.addrs}"
            )
        circuit = await self._bridge.run(self._reserve, relay, direct, timeout)
        if circuit not in self.circuit_addrs:
            self.circuit_addrs.append(circuit)
            self.listen_addrs.append(circuit)
        return circuit

    async def _reserve(self, relay: PeerAddr, direct: list[str], timeout: float) -> str:
        import multiaddr
        from libp2p.peer.peerinfo import PeerInfo
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        host, bridge = self._host, self._bridge
        assert host is not None and bridge is not None and bridge.nursery is not None
        pid = _parse_peer_id(relay.peer_id)
        try:
            with trio.fail_after(timeout):
                try:
                    await host.connect(PeerInfo(pid, [multiaddr.Multiaddr(_strip_p2p(a)) for a in direct]))
                except Exception as e:  # noqa: BLE001
                    raise DialError(f"cannot reach relay {relay.peer_id} at {direct}: {e}") from None
                try:
                    hop = await host.new_stream(pid, [HOP_ID])
                except Exception:  # noqa: BLE001
                    raise RelayError(
                        f"peer {relay.peer_id} offers no relay service (it runs with --no-relay, or is not reachable "
                        "itself); reserve on another publicly reachable daemon"
                    ) from None
                try:
                    ok = await self._relay_transport.reserve(hop, pid, bridge.nursery)
                finally:
                    with trio.CancelScope(shield=True):
                        try:
                            await hop.close()
                        except Exception:  # noqa: BLE001
                            pass
        except trio.TooSlowError:
            raise TimeoutError(f"reserving a relay slot on {relay.peer_id} took longer than {timeout}s") from None
        if not ok:
            raise RelayError(
                f"relay {relay.peer_id} refused a reservation (it is full: at most {RELAY_LIMITS['max_reservations']} "
                "peers per relay); try another relay"
            )
        return f"{_strip_p2p(direct[0])}/p2p/{relay.peer_id}/p2p-circuit/p2p/{self.peer_id}"

    def set_relay_service(self, enabled: bool) -> None:
        """Start or stop relaying for others (HOP) on a running transport: a daemon learns only after start
        whether it is publicly reachable, which is what makes it a useful relay."""
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        self.relay_service = enabled

        def apply() -> None:
            proto, host = self._relay_proto, self._host
            if proto is None or host is None:
                return
            proto.allow_hop = enabled
            if enabled:
                host.set_stream_handler(HOP_ID, proto._handle_hop_stream)
            else:
                host.remove_stream_handler(HOP_ID)

        if self._bridge is not None and self._bridge.token is not None:
            self._bridge.to_trio(apply)

    async def call(self, peer: PeerAddr, protocol_id: str, request: object, timeout: float = 30.0) -> object:
        return await call_over(self, peer, protocol_id, request, timeout)

    # -- introspection -----------------------------------------------------------------------------------------

    def connection_count(self, peer_id: str) -> int:
        """How many connections we hold to `peer_id` (tests check the one-connection-per-peer rule)."""
        from libp2p.peer.id import ID

        if self._host is None:
            return 0
        return len(self._host.get_network().connections.get(ID.from_base58(peer_id), []))


# ---------------------------------------------------------------------------------------------------------------------
# Reachability: ask a peer to dial us back.
#
# libp2p 0.8.1's AutoNAT v1 reports dead ports as reachable, so we do our own: the helper opens a fresh TCP
# connection to each port we name, at the IP it sees our connection come from (never an IP we name: that would
# make every node a port scanner for hire).

DIALBACK_PROTOCOL = "/petal/dialback/1"
DIALBACK_TIMEOUT = 3.0
MAX_DIALBACK_ADDRS = 8


def _parse_peer_id(peer_id: str):  # -> libp2p.peer.id.ID
    """A base58 peer id as libp2p's ID, or DialError saying which id is bad."""
    from libp2p.peer.id import ID

    try:
        return ID.from_base58(peer_id)
    except Exception as e:  # noqa: BLE001 - base58 and multihash raise several types
        raise DialError(f"{peer_id!r} is not a valid libp2p peer id: {e}") from None


def _tcp_port(addr: str) -> int | None:
    parts = addr.split("/")
    try:
        return int(parts[parts.index("tcp") + 1])
    except (ValueError, IndexError):
        return None


async def _tcp_reachable(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def serve_dialback(stream: Libp2pStream) -> None:
    """Handler for DIALBACK_PROTOCOL: request {"addrs": [multiaddr, ...]} -> {"observed_ip", "results"}."""
    request = await stream.recv(timeout=DIALBACK_TIMEOUT)
    addrs = request.get("addrs") if isinstance(request, dict) else None
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ValueError(f"dialback request from {stream.peer_id} is not {{'addrs': [str, ...]}}")
    remote = getattr(stream, "remote_addr", None)
    if remote is None:
        await stream.send({"observed_ip": None, "results": [], "error": "cannot see the address you connect from"})
        return
    ip = remote[0]
    addrs = addrs[:MAX_DIALBACK_ADDRS]
    ports = [None if is_circuit(a) else _tcp_port(a) for a in addrs]
    checks = [_tcp_reachable(ip, p, DIALBACK_TIMEOUT) if p else asyncio.sleep(0, False) for p in ports]
    reachable = await asyncio.gather(*checks)
    results = [
        {"addr": a, "dialed": f"{ip}:{p}" if p else None, "reachable": bool(ok)}
        for a, p, ok in zip(addrs, ports, reachable)
    ]
    await stream.send({"observed_ip": ip, "results": results})


async def check_reachability(transport: Libp2pTransport, helper: PeerAddr, timeout: float = 10.0) -> dict[str, Any]:
    """Ask `helper` (a peer serving DIALBACK_PROTOCOL) whether our listen addresses' ports accept connections
    from outside. Returns {"observed_ip": str | None, "results": [{"addr", "dialed", "reachable"}, ...]}."""
    direct = [a for a in transport.listen_addrs if not is_circuit(a)]  # a circuit's port is the relay's
    answer = await transport.call(helper, DIALBACK_PROTOCOL, {"addrs": direct}, timeout=timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
        raise TransportError(f"peer {helper.peer_id} sent a malformed dialback answer: {answer!r:.200}")
    return answer
