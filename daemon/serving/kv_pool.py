"""The KV budget: one tensor reserved at start (`KVPool`), carved into per-session caches (`Allocation`).

Reserving up front means hours of serving never end in an out-of-memory; a session that finds no room waits up to
`alloc_timeout` for another to free its range, then gets "busy". A session larger than the whole budget gets
"too_large" at once (the caller asked for more than this server could ever give).

Fairness between peers (any peer id is free to make, so this is about keeping a server useful, not about trust):
while the pool is contended (some other peer holds cache or waits for it), one peer may hold at most `peer_share` of
the budget; alone, it may take everything. `waiting` names the peers now waiting, so the block server can close
idle sessions of others to make room (`BlockServer._reclaim`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import torch

from petal.kernels.cache import KVCache
from petal.protocol.errors import PetalError


@dataclass(frozen=True, eq=False)
class Allocation:
    """One session's cache and the range of the pool it occupies (`size` units from `offset`); give it back with
    `KVPool.free`. Compared by identity: freeing the same allocation twice is a no-op."""

    cache: KVCache
    offset: int
    size: int
    owner: str = ""  # the peer the cache was allocated for


class KVPool:
    """The whole KV budget as one tensor, handed out as `KVCache` views (first fit, coalescing frees).

    A unit is one token of one block: a key and a value vector for every KV head.
    """

    def __init__(
        self,
        units: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device,
        *,
        peer_share: float = 1.0,
    ) -> None:
        if units < 1:
            raise ValueError("the KV budget must hold at least one token of one block")
        if not 0 < peer_share <= 1:
            raise ValueError(f"peer_share must be in (0, 1], got {peer_share}")
        self.units = units
        self.peer_share = peer_share
        self._held: dict[str, int] = {}  # owner -> units held
        self._waiting: dict[str, int] = {}  # owner -> allocations now waiting for room
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self._unit_elems = 2 * kv_heads * head_dim
        self.buffer = torch.zeros(units * self._unit_elems, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(0, units)]  # sorted (offset, size)
        self._live: set[Allocation] = set()
        self._freed = asyncio.Event()  # replaced on every free; waiters hold the one they saw

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def free_units(self) -> int:
        return sum(size for _, size in self._free)

    def held(self, owner: str) -> int:
        """Units `owner` holds now."""
        return self._held.get(owner, 0)

    @property
    def waiting(self) -> frozenset[str]:
        """Peers with an allocation waiting for room now."""
        return frozenset(self._waiting)

    def contended(self, owner: str) -> bool:
        """Whether a peer other than `owner` holds cache or waits for it."""
        return any(o != owner for o in self._held) or any(o != owner for o in self._waiting)

    def over_share(self, owner: str, extra: int = 0) -> bool:
        """Whether `owner` holding `extra` more units would exceed its share of a contended pool."""
        return self.contended(owner) and self.held(owner) + extra > self.peer_share * self.units

    def try_allocate(self, blocks: int, batch: int, max_length: int, owner: str = "") -> Allocation | None:
        """A cache for `blocks` x `batch` x `max_length`, or None if no free range is large enough now (or `owner`
        would hold more than its share of a contended pool)."""
        need = blocks * batch * max_length
        if self.over_share(owner, need):
            return None
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, size - need)
                chunk = self.buffer[offset * self._unit_elems : (offset + need) * self._unit_elems]
                kv = chunk.view(2, blocks, batch, self.kv_heads, max_length, self.head_dim)
                cache = KVCache([kv[0, b] for b in range(blocks)], [kv[1, b] for b in range(blocks)])
                allocation = Allocation(cache, offset, need, owner)
                self._live.add(allocation)
                self._held[owner] = self._held.get(owner, 0) + need
                return allocation
        return None

    async def allocate(self, blocks: int, batch: int, max_length: int, timeout: float, owner: str = "") -> Allocation:
        """Wait up to `timeout` seconds for room; raises PetalError("busy") otherwise, and PetalError("too_large") at
        once when the cache could never fit (the caller's mistake: no server with this budget could take it)."""
        need = blocks * batch * max_length
        if need > self.units:
            per_block = self.units // max(blocks, 1)
            raise PetalError(
                "too_large",
                f"a cache of {blocks} blocks x batch {batch} x {max_length} tokens needs {need} token-blocks, more "
                f"than this server's whole KV budget of {self.units} ({per_block} tokens per block for {blocks} "
                "blocks); ask for a shorter max_length or a smaller batch",
            )
        deadline = time.monotonic() + timeout
        allocation = self.try_allocate(blocks, batch, max_length, owner)
        if allocation is not None:
            return allocation
        self._waiting[owner] = self._waiting.get(owner, 0) + 1
        try:
            while (allocation := self.try_allocate(blocks, batch, max_length, owner)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    share = (
                        f"; this peer already holds {self.held(owner)}, its share is "
                        f"{int(self.peer_share * self.units)} while others use the server"
                        if self.over_share(owner, need)
                        else ""
                    )
                    raise PetalError(
                        "busy",
                        f"no KV-cache room for {need} token-blocks within {timeout:.0f}s ({self.free_units} of "
                        f"{self.units} free{share}); retry later or use another server",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), left)
        finally:
            self._waiting[owner] -= 1
            if not self._waiting[owner]:
                del self._waiting[owner]
        return allocation

    def free(self, allocation: Allocation) -> None:
        """Give an allocation's range back (idempotent) and wake waiting sessions."""
        if allocation not in self._live:
            return
        self._live.discard(allocation)
        held = self._held.get(allocation.owner, 0) - allocation.size
        if held > 0:
            self._held[allocation.owner] = held
        else:
            self._held.pop(allocation.owner, None)
        self._free.append((allocation.offset, allocation.size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, sz in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + sz)
            else:
                merged.append((off, sz))
        self._free = merged
        self._freed.set()
        self._freed = asyncio.Event()
