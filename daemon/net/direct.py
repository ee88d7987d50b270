"""The direct data plane: TLS 1.3 over TCP, driven by the asyncio loop itself (no trio thread on the path).

One connection per peer pair carries any number of streams. Each connection message is a 9-byte header
(stream id u32, kind u8, payload length u32, big-endian) and its payload; a stream's DATA payloads are the bytes
of its length-prefixed msgpack frames (`petal.protocol.frames`), decoded per stream, so a malformed frame resets
that stream only. Streams opened by the dialer have odd ids, by the listener even ones. Opening is optimistic (no
round trip): a peer without a handler answers REFUSED, which the opener's `recv` raises as ProtocolNotSupported.

Peers are authenticated with their node identities (`petal.daemon.net.tls`): the listener's certificate key must
derive the peer id the dialer asked for, and the dialer's first message proves its own identity.
Addresses are multiaddrs `/ip4/HOST/tcp/PORT/tls/p2p/PEER` (`is_direct_addr`).

There is no per-stream flow control: every protocol on this plane is request/response with a bounded window
(an inference stream has one step in flight, a push stream at most `PUSH_WINDOW` pushes), so a sender never needs
to run ahead of its reader. What a peer sends beyond that is bounded instead: a stream holding more than
`MAX_UNREAD` bytes of unread messages is reset, and a connection holding more than `MAX_CONN_UNREAD` over all its
streams is closed, so a flooding peer costs at most that much memory and cannot stall the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Final

from petal.daemon import trace
from petal.daemon.identity import Identity
from petal.daemon.net import tls
from petal.daemon.net.addrs import is_direct_addr
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
from petal.protocol.frames import HEADER as FRAME_HEADER
from petal.protocol.frames import WIRE, FrameDecoder, encode_frame, unpack_message

__all__ = ["DirectStream", "DirectTransport", "direct_addr", "is_direct_addr", "parse_direct_addr"]

log = logging.getLogger(__name__)

MUX: Final[struct.Struct] = struct.Struct(">IBI")
OPEN, DATA, CLOSE, RESET, REFUSED, HELLO = range(6)
MAX_PAYLOAD = MAX_FRAME + FRAME_HEADER.size
"""Largest connection message: one whole stream frame (a bigger one ends the connection)."""
MAX_UNREAD = 2 * MAX_PAYLOAD
"""Unread bytes one stream may hold (two whole frames); more resets that stream."""
MAX_CONN_UNREAD = 4 * MAX_PAYLOAD
"""Unread bytes all streams of one connection may hold together; more closes the connection."""
HELLO_TIMEOUT = 10.0
"""How long a listener waits for a dialer's identity proof after the TLS handshake."""
_EOF = object()


def direct_addr(host: str, port: int, peer_id: str) -> str:
    proto = "ip6" if ":" in host else "ip4"
    return f"/{proto}/{host}/tcp/{port}/tls/p2p/{peer_id}"


def parse_direct_addr(addr: str) -> tuple[str, int]:
    """(host, port) of `/ip4|ip6|dns/HOST/tcp/PORT/tls[/p2p/ID]`; DialError for anything else."""
    parts = addr.strip().split("/")
    if len(parts) < 6 or parts[0] or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp":
        raise DialError(f"bad direct address {addr!r}: use /ip4/HOST/tcp/PORT/tls/p2p/PEER")
    if parts[5] != "tls" or not parts[4].isdigit() or not 0 < int(parts[4]) < 65536:
        raise DialError(f"bad direct address {addr!r}: use /ip4/HOST/tcp/PORT/tls/p2p/PEER")
    return parts[2], int(parts[4])


class DirectStream(StreamBase):
    """One stream on a direct connection; every method runs on the event loop."""

    def __init__(self, conn: Connection, sid: int, protocol_id: str) -> None:
        self.peer_id = conn.peer_id
        self.protocol_id = protocol_id
        self._conn = conn
        self._sid = sid
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._sizes: collections.deque[int] = collections.deque()  # wire bytes of each unread message, in order
        self._unread = 0
        self._decoder = FrameDecoder(MAX_FRAME)
        self._write_closed = False
        self._read_closed = False
        self._end: TransportError | None = None  # set once aborted (reset, refused, connection lost)

    # -- caller side ---------------------------------------------------------------------------------------------

    async def send(self, message: object) -> None:
        if self._end is not None:
            raise self._end
        if self._write_closed:
            raise StreamClosed(f"the {self.protocol_id} stream to {self.peer_id} is closed for sending")
        await self._conn.send(self._sid, DATA, encode_frame(message, max_frame=MAX_FRAME))

    def thread_sender(self) -> Callable[[object], None]:
        """See `petal.daemon.net.transport.thread_sender`: encode in the calling thread, write in one loop callback
        (or at once, when called on the loop's own thread: a step run inline)."""
        loop = asyncio.get_running_loop()
        owner = threading.get_ident()

        def send(message: object) -> None:
            frame = encode_frame(message, max_frame=MAX_FRAME)
            if threading.get_ident() == owner:
                self._post_frame(frame)
            else:
                loop.call_soon_threadsafe(self._post_frame, frame)

        return send

    def _post_frame(self, frame: bytes) -> None:
        if self._end is None and not self._write_closed:
            self._conn.post(self._sid, DATA, frame)
            trace.mark("net.out")

    async def _send_raw(self, data: bytes) -> None:
        """Write bytes that are not a frame (tests use it to check how peers treat garbage)."""
        await self._conn.send(self._sid, DATA, data)

    async def recv(self, timeout: float | None = None) -> object:
        item = await self._next_item(timeout)
        if self._sizes and item is not _EOF and not isinstance(item, TransportError):
            self._consumed(self._sizes.popleft())
        if item is _EOF or isinstance(item, TransportError):
            self._inbox.put_nowait(item)  # every later recv sees the same end
            if item is _EOF:
                raise StreamClosed(f"peer {self.peer_id} closed the {self.protocol_id} stream")
            assert isinstance(item, TransportError)
            raise item
        return item

    async def close(self) -> None:
        if self._write_closed or self._end is not None:
            return
        self._write_closed = True
        self._conn.post(self._sid, CLOSE)
        self._forget_if_done()

    async def reset(self) -> None:
        if self._end is not None:
            return
        self._abort(StreamReset(f"the {self.protocol_id} stream to {self.peer_id} was reset by us"))
        self._conn.post(self._sid, RESET)

    # -- connection side ------------------------------------------------------------------------------------------

    def _consumed(self, size: int) -> None:
        self._unread -= size
        self._conn.unread -= size

    def _queue(self, message: object, size: int) -> None:
        self._inbox.put_nowait(message)
        self._sizes.append(size)
        self._unread += size
        self._conn.unread += size

    def _on_data(self, payload: bytes) -> None:
        if self._end is not None or self._read_closed:
            return
        if self._unread + len(payload) > MAX_UNREAD:
            log.warning(
                "%s from %s: over %d unread bytes (the peer does not wait for answers); resetting the stream",
                self.protocol_id,
                self.peer_id,
                MAX_UNREAD,
            )
            self._abort(StreamReset(f"{self.protocol_id} from {self.peer_id} sent more than it may have unread"))
            self._conn.post(self._sid, RESET)
            return
        try:
            if not self._decoder.buffered and len(payload) >= FRAME_HEADER.size:
                (length,) = FRAME_HEADER.unpack_from(payload)
                if length == len(payload) - FRAME_HEADER.size and length <= MAX_FRAME:  # one whole frame: no copy
                    WIRE.received += len(payload)  # (the decoder counts what it is fed)
                    with memoryview(payload) as view:
                        self._queue(unpack_message(view[FRAME_HEADER.size :]), len(payload))
                    return
            messages = self._decoder.feed(payload)
            for i, m in enumerate(messages):
                self._queue(m, len(payload) if i == 0 else 0)
            if messages:
                self._decoder.feed(b"")  # a bad frame behind good ones raises only now
        except WireError as e:
            self._malformed(e)

    def _on_close(self) -> None:
        if self._end is not None or self._read_closed:
            return
        try:
            self._decoder.eof()
        except WireError as e:
            self._malformed(e)
            return
        self._read_closed = True
        self._inbox.put_nowait(_EOF)
        self._forget_if_done()

    def _malformed(self, e: WireError) -> None:
        log.warning("malformed frame on %s from %s: %s; resetting the stream", self.protocol_id, self.peer_id, e)
        self._abort(StreamReset(f"malformed frame on {self.protocol_id} from {self.peer_id}: {e}"))
        self._conn.post(self._sid, RESET)

    def _abort(self, error: TransportError) -> None:
        self._conn.unread -= self._unread  # what it holds no longer counts against the connection
        self._unread = 0
        self._sizes.clear()
        if self._end is None:
            self._end = error
            self._write_closed = True
            self._inbox.put_nowait(error)
        self._conn.streams.pop(self._sid, None)

    def _forget_if_done(self) -> None:
        if self._write_closed and self._read_closed:
            self._conn.streams.pop(self._sid, None)


class Connection:
    """One authenticated TLS connection to a peer, multiplexing streams."""

    def __init__(
        self,
        transport: DirectTransport,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_id: str,
        outbound: bool,
    ) -> None:
        self.transport = transport
        self.peer_id = peer_id
        self.streams: dict[int, DirectStream] = {}
        self._reader = reader
        self._writer = writer
        self._next_sid = 1 if outbound else 2
        self._outbound = outbound
        self.unread = 0  # bytes of messages queued on its streams and not yet read (see MAX_CONN_UNREAD)
        self.closed = False
        self.reader_task: asyncio.Task[None] | None = None

    def open(self, protocol_id: str) -> DirectStream:
        if self.closed:
            raise DialError(f"the direct connection to {self.peer_id} is closed")
        sid, self._next_sid = self._next_sid, self._next_sid + 2
        stream = DirectStream(self, sid, protocol_id)
        self.streams[sid] = stream
        self.post(sid, OPEN, protocol_id.encode())
        return stream

    def post(self, sid: int, kind: int, payload: bytes = b"") -> None:
        """Queue a message without waiting for the socket buffer (control messages, tiny)."""
        if not self.closed:
            self._writer.write(MUX.pack(sid, kind, len(payload)) + payload)

    async def send(self, sid: int, kind: int, payload: bytes) -> None:
        if self.closed:
            raise StreamReset(f"the direct connection to {self.peer_id} is closed")
        try:
            self._writer.write(MUX.pack(sid, kind, len(payload)) + payload)
            trace.mark("net.out")
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as e:
            self.shut(f"{type(e).__name__}: {e}")
            raise StreamReset(f"cannot send to {self.peer_id}: the direct connection dropped ({e})") from None

    async def read_loop(self) -> None:
        reason = "closed by the peer"
        try:
            while True:
                sid, kind, length = MUX.unpack(await self._reader.readexactly(MUX.size))
                if length > MAX_PAYLOAD:
                    reason = f"peer sent a {length}-byte message; the limit is {MAX_PAYLOAD}"
                    log.warning("direct connection to %s: %s; closing it", self.peer_id, reason)
                    return
                payload = await self._reader.readexactly(length) if length else b""
                if not self._dispatch(sid, kind, payload):
                    reason = f"protocol violation (kind {kind} on stream {sid})"
                    log.warning("direct connection to %s: %s; closing it", self.peer_id, reason)
                    return
                if self.unread > MAX_CONN_UNREAD:
                    reason = f"over {MAX_CONN_UNREAD} unread bytes on its streams"
                    log.warning("direct connection to %s: %s; closing it", self.peer_id, reason)
                    return
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError, ssl.SSLError) as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            self.shut(reason)

    def _dispatch(self, sid: int, kind: int, payload: bytes) -> bool:
        stream = self.streams.get(sid)
        trace.mark("net.in")
        if kind == DATA:
            if stream is not None:
                stream._on_data(payload)
        elif kind == OPEN:
            if stream is not None or sid % 2 == self._next_sid % 2 or sid == 0:
                return False
            try:
                protocol_id = payload.decode()
            except UnicodeDecodeError:
                return False
            handler = self.transport.handlers.get(protocol_id)
            if handler is None:
                self.post(sid, REFUSED)
                return True
            stream = DirectStream(self, sid, protocol_id)
            self.streams[sid] = stream
            self.transport.spawn_handler(stream, handler)
        elif kind == CLOSE:
            if stream is not None:
                stream._on_close()
        elif kind == RESET:
            if stream is not None:
                stream._abort(StreamReset(f"peer {self.peer_id} reset the {stream.protocol_id} stream"))
        elif kind == REFUSED:
            if stream is not None:
                stream._abort(ProtocolNotSupported(f"peer {self.peer_id} does not serve protocol {stream.protocol_id}"))
        else:
            return False
        return True

    def shut(self, reason: str) -> None:
        """End the connection and every stream on it (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            stream._abort(StreamReset(f"connection to {self.peer_id} closed: {reason}"))
        self.streams.clear()
        self.transport.forget(self)
        with contextlib.suppress(Exception):
            self._writer.close()


class DirectTransport:
    """The `Transport` contract over TLS/TCP on the asyncio loop. `listen` is "HOST:PORT" (port 0: any)."""

    def __init__(
        self, identity: Identity, listen: str = "127.0.0.1:0", announce_hosts: list[str] | None = None
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"direct listen address {listen!r}: use HOST:PORT, e.g. 0.0.0.0:31331")
        self._bind_host, self._port = host.strip("[]"), int(port)
        self.announce_hosts = announce_hosts
        self.listen_addrs: list[str] = []
        self.handlers: dict[str, Handler] = {}
        self._conns: dict[str, list[Connection]] = {}
        self._dials: dict[str, asyncio.Task[Connection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._own_der = b""

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        server_ctx, self._own_der = tls.server_context(self.identity)
        self._client_ctx = tls.client_context()
        try:
            self._server = await asyncio.start_server(self._accept, self._bind_host, self._port, ssl=server_ctx)
        except OSError as e:
            raise TransportError(f"cannot listen for direct connections on {self._bind_host}:{self._port}: {e}") from e
        port = self._server.sockets[0].getsockname()[1]
        wildcard = self._bind_host in ("", "0.0.0.0", "::")
        hosts = self.announce_hosts if wildcard and self.announce_hosts else [self._bind_host or "127.0.0.1"]
        self.listen_addrs = [direct_addr(h, port, self.peer_id) for h in hosts]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for dial in list(self._dials.values()):
            dial.cancel()
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.shut("the transport stopped")
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._dials.values(), *self._tasks, return_exceptions=True)
        self._dials.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    def set_handler(self, protocol_id: str, handler: Handler) -> None:
        self.handlers[protocol_id] = handler

    def connection_count(self, peer_id: str) -> int:
        return len(self._conns.get(peer_id, []))

    def open_stream_count(self, peer_id: str) -> int:
        """Streams still open (in either direction) on the connections to `peer_id`."""
        return sum(len(c.streams) for c in self._conns.get(peer_id, []))

    def connected(self, peer_id: str) -> bool:
        return any(not c.closed for c in self._conns.get(peer_id, []))

    # -- streams --------------------------------------------------------------------------------------------------

    async def open_stream(self, peer: PeerAddr, protocol_id: str, timeout: float = 10.0) -> DirectStream:
        if self._server is None:
            raise DialError("the direct transport is not running: call start() first")
        await asyncio.sleep(0)  # opening yields (and can be cancelled) even on a live connection
        conns = [c for c in self._conns.get(peer.peer_id, []) if not c.closed]
        if conns:
            return conns[0].open(protocol_id)
        dial = self._dials.get(peer.peer_id)
        if dial is None:
            dial = self._dials[peer.peer_id] = asyncio.get_running_loop().create_task(self._dial(peer))
            dial.add_done_callback(functools.partial(self._dial_done, peer.peer_id))
        try:
            conn = await asyncio.wait_for(asyncio.shield(dial), timeout)
        except TimeoutError:
            raise TimeoutError(f"dialing {peer.peer_id} directly took longer than {timeout}s") from None
        return conn.open(protocol_id)

    async def call(self, peer: PeerAddr, protocol_id: str, request: object, timeout: float = 30.0) -> object:
        return await call_over(self, peer, protocol_id, request, timeout)

    # -- connections ----------------------------------------------------------------------------------------------

    def _dial_done(self, peer_id: str, task: asyncio.Task[Connection]) -> None:
        if self._dials.get(peer_id) is task:
            del self._dials[peer_id]
        if not task.cancelled():
            task.exception()  # retrieved: a failed dial is reported to whoever awaited it, not logged as lost

    async def _dial(self, peer: PeerAddr) -> Connection:
        addrs = [a for a in peer.addrs if is_direct_addr(a)]
        if not addrs:
            raise DialError(f"peer {peer.peer_id} announced no direct address (/tls) in {list(peer.addrs)}")
        errors = []
        for addr in addrs:
            host, port = parse_direct_addr(addr)
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=self._client_ctx, server_hostname="")
            except (OSError, ssl.SSLError) as e:
                errors.append(f"{addr}: {e}")
                continue
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            try:
                actual = tls.peer_id_of_certificate(der)
                if actual != peer.peer_id:
                    raise tls.PeerAuthError(f"{addr} is peer {actual}, not {peer.peer_id}")
            except tls.PeerAuthError as e:
                writer.close()
                raise DialError(f"refusing the direct connection: {e}") from None
            assert der is not None
            proof = tls.client_proof(self.identity, der)
            writer.write(MUX.pack(0, HELLO, len(proof)) + proof)
            log.info("direct connection to peer %s at %s", peer.peer_id, addr)
            return self._adopt(reader, writer, peer.peer_id, outbound=True)
        raise DialError(f"cannot reach peer {peer.peer_id} directly: {'; '.join(errors)}")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                sid, kind, length = MUX.unpack(await reader.readexactly(MUX.size))
                if sid != 0 or kind != HELLO or length > 1024:
                    raise tls.PeerAuthError("the dialer's first message is not an identity proof")
                peer_id = tls.check_client_proof(await reader.readexactly(length), self._own_der)
        except (tls.PeerAuthError, TimeoutError, asyncio.IncompleteReadError, OSError, ssl.SSLError) as e:
            log.info("refused a direct connection from %s: %s", writer.get_extra_info("peername"), e)
            writer.close()
            return
        if self._server is None:
            writer.close()
            return
        log.info("direct connection from peer %s at %s", peer_id, writer.get_extra_info("peername"))
        conn = self._adopt(reader, writer, peer_id, outbound=False)
        assert conn.reader_task is not None
        with contextlib.suppress(asyncio.CancelledError):
            await conn.reader_task

    def _adopt(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer_id: str, outbound: bool
    ) -> Connection:
        conn = Connection(self, reader, writer, peer_id, outbound)
        self._conns.setdefault(peer_id, []).append(conn)
        conn.reader_task = asyncio.get_running_loop().create_task(conn.read_loop())
        self._track(conn.reader_task)
        return conn

    def forget(self, conn: Connection) -> None:
        conns = self._conns.get(conn.peer_id, [])
        if conn in conns:
            conns.remove(conn)
        if not conns:
            self._conns.pop(conn.peer_id, None)

    def spawn_handler(self, stream: DirectStream, handler: Handler) -> None:
        self._track(asyncio.get_running_loop().create_task(serve_stream(stream, handler)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
