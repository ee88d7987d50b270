"""Block traffic over the direct data plane where a peer offers one, libp2p for everything else.

`CompositeTransport` is the `Transport` a daemon uses when its `direct` option is set. Streams of the block
protocols (`/petal/block/...`) to a peer that announced a direct address (`/tls` multiaddr, see
`petal.daemon.net.direct`) go over a direct TLS connection; when that peer cannot be dialed directly (it sits
behind a NAT and is reachable only through a relay, or its direct port is firewalled), the stream goes over
libp2p and direct dials to that peer pause for `DIRECT_BACKOFF` seconds. Discovery, node info, dialback and relays
stay on libp2p. Every attribute not defined here (relay reservations, ...) is the libp2p transport's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from petal.daemon.net.addrs import is_circuit, is_direct_addr
from petal.daemon.net.direct import DirectTransport
from petal.daemon.net.p2p import Libp2pTransport
from petal.daemon.net.transport import DialError, Handler, PeerAddr, Stream, call_over

log = logging.getLogger(__name__)

DIRECT_PREFIXES = ("/petal/block/",)
DIRECT_DIAL_TIMEOUT = 3.0
"""Longest a first direct dial may take before we fall back to libp2p (loopback and LAN dials take milliseconds)."""
DIRECT_BACKOFF = 60.0
"""After a failed direct dial, how long streams to that peer go over libp2p without trying again."""


class CompositeTransport:
    def __init__(self, libp2p: Libp2pTransport, direct: DirectTransport) -> None:
        self.libp2p = libp2p
        self.direct = direct
        self.peer_id = libp2p.peer_id
        self._failed: dict[str, float] = {}  # peer id -> monotonic time of the last failed direct dial
        self.direct_streams = 0  # counters for status and tests
        self.fallback_streams = 0

    @property
    def listen_addrs(self) -> list[str]:
        """The libp2p addresses (what node info, bootstrap lines and relays use); see `direct_addrs`."""
        return self.libp2p.listen_addrs

    @listen_addrs.setter
    def listen_addrs(self, addrs: list[str]) -> None:
        self.libp2p.listen_addrs = addrs

    @property
    def direct_addrs(self) -> list[str]:
        return self.direct.listen_addrs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.libp2p, name)

    async def start(self) -> None:
        await self.libp2p.start()
        if self.direct.announce_hosts is None:
            hosts = []
            for addr in self.libp2p.listen_addrs:
                parts = addr.split("/")
                if not is_circuit(addr) and len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in hosts:
                    hosts.append(parts[2])
            self.direct.announce_hosts = hosts or None
        try:
            await self.direct.start()
        except BaseException:
            await self.libp2p.stop()
            raise

    async def stop(self) -> None:
        try:
            await self.direct.stop()
        finally:
            await self.libp2p.stop()

    def set_handler(self, protocol_id: str, handler: Handler) -> None:
        self.libp2p.set_handler(protocol_id, handler)
        if protocol_id.startswith(DIRECT_PREFIXES):
            self.direct.set_handler(protocol_id, handler)

    async def open_stream(self, peer: PeerAddr, protocol_id: str, timeout: float = 10.0) -> Stream:
        direct = tuple(a for a in peer.addrs if is_direct_addr(a))
        others = tuple(a for a in peer.addrs if not is_direct_addr(a))
        if direct and protocol_id.startswith(DIRECT_PREFIXES):
            failed_at = self._failed.get(peer.peer_id)
            if failed_at is None or time.monotonic() - failed_at > DIRECT_BACKOFF:
                try:
                    limit = timeout if self.direct.connected(peer.peer_id) else min(timeout, DIRECT_DIAL_TIMEOUT)
                    stream = await self.direct.open_stream(PeerAddr(peer.peer_id, direct), protocol_id, limit)
                except (DialError, TimeoutError) as e:
                    self._failed[peer.peer_id] = time.monotonic()
                    log.info("no direct connection to %s (%s); using libp2p", peer.peer_id, e)
                else:
                    self._failed.pop(peer.peer_id, None)
                    self.direct_streams += 1
                    return stream
            self.fallback_streams += 1
        return await self.libp2p.open_stream(PeerAddr(peer.peer_id, others), protocol_id, timeout)

    async def call(self, peer: PeerAddr, protocol_id: str, request: object, timeout: float = 30.0) -> object:
        return await call_over(self, peer, protocol_id, request, timeout)
