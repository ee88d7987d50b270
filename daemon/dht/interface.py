"""What the rest of the daemon uses of the DHT: the ``SwarmDHT`` Protocol.

Serving, routing and the API type against this, not against the Kademlia node, so unit tests can hand
them an in-memory DHT (``petal.daemon.dht.memory.MemoryDHT``) and need no UDP ports. Both implementations
keep the same semantics: one signed ``Entry`` per signer per key, merged with every other signer's,
expired by TTL, freshest first; ``withdraw`` replaces only our own entry with a short-lived offline one.
A full key is shared fairly (``storage.py``): many identities on one address cannot crowd out servers that answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from petal.protocol.records import Entry

__all__ = ["Entry", "SwarmDHT"]


class SwarmDHT(Protocol):
    """A DHT of signed, per-signer-merged, expiring entries under string keys."""

    async def get(self, key: str) -> list[Entry]:
        """Every signer's current (unexpired, verified) entry under ``key``, freshest first."""
        ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, list[Entry]]:
        """``get`` for several keys at once, keyed by each of ``keys``."""
        ...

    async def announce(self, key: str, value: dict[str, Any], ttl: float) -> int:
        """Sign ``value`` under ``key`` for ``ttl`` seconds and store it; returns how many nodes took it.

        Raises ``petal.protocol.records.RecordError`` for a bad value or TTL.
        """
        ...

    async def withdraw(self, key: str) -> None:
        """Replace our own entry under ``key`` with a short-lived offline one (others' are untouched)."""
        ...
