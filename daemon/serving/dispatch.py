"""One transport, several block servers: the block protocols have one handler per transport, so a daemon serving
spans of two models (or two spans of one model) registers them once, here, and routes each request to the server of
its model and blocks.

The first message of every block stream names the model and (except info) the blocks, so `BlockDispatcher` reads
it, picks the server (`pick`) and hands the stream over with that message; push frames name the inference session
they feed, so each is delivered to the server holding that session. A request no server fits goes to the closest
one (same model, else any), whose validators answer with the usual error naming what it hosts.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from petal.daemon import trace
from petal.daemon.net.transport import Stream, StreamClosed, Transport
from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
    PushRequest,
    ServedSpan,
    error_reply,
)

log = logging.getLogger("petal.server")

FIRST_MESSAGE_TIMEOUT = 30.0  # a caller that opens a stream must say what it wants within this
ROUTED_PROTOCOLS = (INFO_PROTOCOL, FORWARD_PROTOCOL, BACKWARD_PROTOCOL, INFERENCE_PROTOCOL)
"""Protocols whose first message names model and blocks: one request (or one inference session) per stream."""


class Routable(Protocol):
    """What the dispatcher needs of a block server (`petal.daemon.serving.block_server.BlockServer`)."""

    served: ServedSpan

    @property
    def push_idle_timeout(self) -> float: ...

    def has_session(self, session: str) -> bool: ...

    async def handle(self, protocol: str, stream: Stream, msg: object) -> None: ...

    def receive_push(self, sender: str, msg: object) -> dict[str, Any]: ...

    def deliver(self, sender: str, push: PushRequest) -> None: ...


_DISPATCHERS: weakref.WeakKeyDictionary[Transport, BlockDispatcher] = weakref.WeakKeyDictionary()


def dispatcher_for(transport: Transport) -> BlockDispatcher:
    """The one dispatcher of `transport` (made, and its handlers registered, on first use)."""
    dispatcher = _DISPATCHERS.get(transport)
    if dispatcher is None:
        dispatcher = _DISPATCHERS[transport] = BlockDispatcher(transport)
    return dispatcher


class BlockDispatcher:
    """Routes the block protocols of one transport to the servers on it (`add`/`remove`, in serving order)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.servers: list[Routable] = []
        self._installed = False

    def add(self, server: Routable) -> None:
        if server not in self.servers:
            self.servers.append(server)
        if not self._installed:
            for protocol in ROUTED_PROTOCOLS:
                self.transport.set_handler(protocol, self._handler(protocol))
            self.transport.set_handler(PUSH_PROTOCOL, self._handle_push)
            self._installed = True

    def remove(self, server: Routable) -> None:
        if server in self.servers:
            self.servers.remove(server)

    def pick(self, msg: object) -> Routable | None:
        """The server `msg` is for: same model and a span holding its blocks (`start`, and `end` when given); else
        the first of that model, else the first at all (its validator then says what it hosts); None if none."""
        if not self.servers:
            return None
        if not isinstance(msg, dict):
            return self.servers[0]
        same = [s for s in self.servers if s.served.model == msg.get("model")]
        start, end = msg.get("start"), msg.get("end")
        if isinstance(start, int):
            last = end - 1 if isinstance(end, int) and end > start else start
            for s in same:
                if s.served.start <= start and last < s.served.end:
                    return s
        return same[0] if same else self.servers[0]

    def _handler(self, protocol: str) -> Callable[[Stream], Any]:
        async def handle(stream: Stream) -> None:
            msg = await stream.recv(timeout=FIRST_MESSAGE_TIMEOUT)
            server = self.pick(msg)
            if server is None:
                error = PetalError("unknown_block", "this peer serves no blocks now; refresh your view of the swarm")
                await stream.send(error_reply(error))
                return
            await server.handle(protocol, stream, msg)

        return handle

    def _session_server(self, session: object) -> Routable | None:
        return next((s for s in self.servers if isinstance(session, str) and s.has_session(session)), None)

    def deliver(self, sender: str, push: PushRequest) -> None:
        """A push from this daemon to itself (consecutive hops on its own spans): straight to the session's inbox."""
        server = self._session_server(push.session) or (self.servers[0] if self.servers else None)
        if server is None:
            raise PetalError("not_found", "push: this peer serves no blocks now")
        server.deliver(sender, push)

    async def _handle_push(self, stream: Stream) -> None:
        """Pushes from one previous hop, one ack (or an error frame) each, until it closes; each frame goes to the
        server holding its session."""
        while True:
            timeout = max((s.push_idle_timeout for s in self.servers), default=FIRST_MESSAGE_TIMEOUT)
            try:
                msg = await stream.recv(timeout=timeout)
            except (StreamClosed, TimeoutError):
                return
            trace.mark("push.in")
            session = msg.get("session") if isinstance(msg, dict) else None
            server = self._session_server(session) or (self.servers[0] if self.servers else None)
            if server is None:
                reply = error_reply(PetalError("not_found", "push: this peer serves no blocks now"))
            else:
                reply = server.receive_push(stream.peer_id, msg)
            await stream.send(reply)
