"""Per-peer bans with exponential backoff: the router's memory of which servers failed recently."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class BanList:
    """Peers that failed recently; each consecutive failure doubles the ban (``base`` .. ``cap`` seconds)."""

    base: float = 2.0
    cap: float = 300.0
    clock: Callable[[], float] = time.monotonic
    max_peers: int = 4096  # peers remembered; past it, those whose ban has run out are forgotten (strikes too)
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer_id: str) -> float:
        """Ban ``peer_id``; returns the ban's length in seconds."""
        if len(self._strikes) >= self.max_peers:
            now = self.clock()
            for peer in [p for p in self._strikes if self._until.get(p, now) <= now]:
                self._strikes.pop(peer, None)
                self._until.pop(peer, None)
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        length = min(self.cap, self.base * 2.0 ** (strikes - 1))
        self._until[peer_id] = self.clock() + length
        return length

    def is_banned(self, peer_id: str) -> bool:
        until = self._until.get(peer_id)
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[peer_id]  # strikes stay, so a flapping server is banned longer next time
            return False
        return True

    def succeeded(self, peer_id: str) -> None:
        """A successful call clears the strikes: the next failure starts from ``base`` again."""
        self._strikes.pop(peer_id, None)
        self._until.pop(peer_id, None)
