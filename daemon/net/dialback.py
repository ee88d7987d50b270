"""Reachability: ask a peer to dial us back (``check_reachability``), and answer such asks (``serve_dialback``).

libp2p 0.8.1's AutoNAT v1 reports dead ports as reachable, so we do our own: the helper opens a fresh TCP
connection to each port we name, at the IP it sees our connection come from (never an IP we name: that would
make every node a port scanner for hire).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from petal.daemon.net.addrs import is_circuit
from petal.daemon.net.transport import PeerAddr, Stream, Transport, TransportError

__all__ = ["DIALBACK_PROTOCOL", "check_reachability", "serve_dialback"]

DIALBACK_PROTOCOL = "/petal/dialback/1"
DIALBACK_TIMEOUT = 3.0
MAX_DIALBACK_ADDRS = 8


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
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def serve_dialback(stream: Stream) -> None:
    """Handler for DIALBACK_PROTOCOL: request {"addrs": [multiaddr, ...]} -> {"observed_ip", "results"}."""
    request = await stream.recv(timeout=DIALBACK_TIMEOUT)
    addrs = request.get("addrs") if isinstance(request, dict) else None
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ValueError(f"dialback request from {stream.peer_id} is not {{'addrs': [str, ...]}}")
    remote = getattr(stream, "remote_addr", None)  # only libp2p streams know the address they come from
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
        for a, p, ok in zip(addrs, ports, reachable, strict=True)
    ]
    await stream.send({"observed_ip": ip, "results": results})


async def check_reachability(transport: Transport, helper: PeerAddr, timeout: float = 10.0) -> dict[str, Any]:
    """Ask `helper` (a peer serving DIALBACK_PROTOCOL) whether our listen addresses' ports accept connections
    from outside. Returns {"observed_ip": str | None, "results": [{"addr", "dialed", "reachable"}, ...]}."""
    direct = [a for a in transport.listen_addrs if not is_circuit(a)]  # a circuit's port is the relay's
    answer = await transport.call(helper, DIALBACK_PROTOCOL, {"addrs": direct}, timeout=timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
        raise TransportError(f"peer {helper.peer_id} sent a malformed dialback answer: {answer!r:.200}")
    return answer
