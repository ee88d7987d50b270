"""The few multiaddr shapes petald uses (/ip4|ip6|dns/HOST/tcp|udp/PORT[/p2p/PEER_ID], relay circuits) and peer ids.

String work only; ``parse_peer_id`` imports libp2p lazily (it is slow to import and config parsing needs none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from petal.daemon.net.transport import DialError

if TYPE_CHECKING:
    from libp2p.peer.id import ID


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int
    transport: str  # "tcp" or "udp"
    peer_id: str | None = None

    def multiaddr(self) -> str:
        proto = "ip6" if ":" in self.host else "ip4"
        tail = f"/p2p/{self.peer_id}" if self.peer_id else ""
        return f"/{proto}/{self.host}/{self.transport}/{self.port}{tail}"


def parse_multiaddr(addr: str) -> HostPort:
    """Parse the subset petald needs; anything else gets an error naming the expected shape."""
    parts = addr.strip().split("/")
    shape = "/ip4/HOST/tcp/PORT/p2p/PEER_ID (e.g. /ip4/127.0.0.1/tcp/31330/p2p/12D3KooW...)"
    if len(parts) < 5 or parts[0] != "" or parts[1] not in {"ip4", "ip6", "dns", "dns4", "dns6"}:
        raise ValueError(f"cannot parse address {addr!r}: expected {shape}")
    if parts[3] not in {"tcp", "udp"}:
        raise ValueError(f"address {addr!r} has no tcp or udp port: expected {shape}")
    try:
        port = int(parts[4])
    except ValueError:
        raise ValueError(f"address {addr!r}: port {parts[4]!r} is not a number") from None
    if not 0 <= port < 65536:
        raise ValueError(f"address {addr!r}: port {port} is out of range")
    peer_id = None
    rest = parts[5:]
    if rest:
        if len(rest) != 2 or rest[0] != "p2p" or not rest[1]:
            raise ValueError(f"cannot parse address {addr!r}: expected {shape}")
        peer_id = rest[1]
    return HostPort(parts[2], port, parts[3], peer_id)


def is_direct_addr(addr: str) -> bool:
    """Whether `addr` is a direct data plane address (`/ip4/HOST/tcp/PORT/tls/p2p/PEER`, petal.daemon.net.direct),
    which libp2p does not dial."""
    return "/tls/" in addr or addr.endswith("/tls")


def is_circuit(addr: str) -> bool:
    """Whether `addr` is a relayed address (`.../p2p/RELAY/p2p-circuit/p2p/PEER`)."""
    return "/p2p-circuit" in addr


def strip_p2p(addr: str) -> str:
    """The transport part of a multiaddr ("/ip4/1.2.3.4/tcp/5/p2p/Qm.." -> "/ip4/1.2.3.4/tcp/5")."""
    i = addr.find("/p2p/")
    return addr if i < 0 else addr[:i]


def parse_peer_id(peer_id: str) -> ID:
    """A base58 peer id as libp2p's ID, or DialError saying which id is bad."""
    from libp2p.peer.id import ID

    try:
        return ID.from_base58(peer_id)
    except Exception as e:  # noqa: BLE001 - base58 and multihash raise several types
        raise DialError(f"{peer_id!r} is not a valid libp2p peer id: {e}") from None
