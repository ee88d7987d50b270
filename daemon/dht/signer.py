"""Our own entries, as both DHT implementations sign them: ``EntrySigner``.

Shared by ``DHT`` (UDP) and ``MemoryDHT`` so that announcing and withdrawing mean the same in both: a TTL
in ``(0, MAX_TTL]``, strictly increasing issue times (two announces in one clock tick still replace each
other), and a withdrawal that keeps the last announced value with its state set to offline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from petal.daemon.identity import Identity
from petal.protocol.records import MAX_TTL, OFFLINE, STATE_FIELD, Entry, RecordError, sign_entry

__all__ = ["WITHDRAW_TTL", "EntrySigner"]

WITHDRAW_TTL = 120.0
"""How long the offline entry that ``withdraw`` leaves behind lives (long enough for every reader to see it)."""


class EntrySigner:
    """Signs this node's entries and remembers what it announced, for ``withdraw``."""

    def __init__(self, identity: Identity, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self._clock = clock
        self._announced: dict[str, dict[str, Any]] = {}
        self._last_issued = 0.0

    def _issue_time(self) -> float:
        """Strictly increasing, so two announces in one clock tick still replace each other."""
        now = max(self._clock(), self._last_issued + 1e-6)
        self._last_issued = now
        return now

    def sign(self, key: str, value: dict[str, Any], ttl: float) -> Entry:
        """Our signed entry for ``value`` under ``key``, valid ``ttl`` seconds. Raises RecordError if not allowed."""
        if not 0 < ttl <= MAX_TTL:
            raise RecordError(f"ttl must be in (0, {MAX_TTL:.0f}] seconds, got {ttl}; re-announce periodically")
        issued_at = self._issue_time()
        entry = sign_entry(self.identity, key, value, issued_at=issued_at, expires_at=issued_at + ttl)
        if entry.state != OFFLINE:
            self._announced[key] = dict(value)
        return entry

    def withdrawal(self, key: str) -> dict[str, Any]:
        """The value that replaces our entry under ``key`` on withdraw: the last one announced, marked offline."""
        value = dict(self._announced.pop(key, {}))
        value[STATE_FIELD] = OFFLINE
        return value
