"""The KV budget: one tensor reserved at start (`KVPool`), carved into per-session caches (`Allocation`).

Reserving up front means hours of serving never end in an out-of-memory; a session that finds no room waits up to
`alloc_timeout` for another to free its range, then gets "busy".
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


class KVPool:
    """The whole KV budget as one tensor, handed out as `KVCache` views (first fit, coalescing frees).

    A unit is one token of one block: a key and a value vector for every KV head.
    """

    def __init__(
        self, units: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        if units < 1:
            raise ValueError("the KV budget must hold at least one token of one block")
        self.units = units
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

    def try_allocate(self, blocks: int, batch: int, max_length: int) -> Allocation | None:
        """A cache for `blocks` x `batch` x `max_length`, or None if no free range is large enough now."""
        need = blocks * batch * max_length
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, size - need)
                chunk = self.buffer[offset * self._unit_elems : (offset + need) * self._unit_elems]
                kv = chunk.view(2, blocks, batch, self.kv_heads, max_length, self.head_dim)
                cache = KVCache([kv[0, b] for b in range(blocks)], [kv[1, b] for b in range(blocks)])
                allocation = Allocation(cache, offset, need)
                self._live.add(allocation)
                return allocation
        return None

    async def allocate(self, blocks: int, batch: int, max_length: int, timeout: float) -> Allocation:
        """Wait up to `timeout` seconds for room; raises PetalError("busy") otherwise."""
        need = blocks * batch * max_length
        if need > self.units:
            raise PetalError(
                "busy",
                f"a cache of {blocks} blocks x batch {batch} x {max_length} tokens needs {need} token-blocks, more "
                f"than this server's whole budget of {self.units}; ask for a shorter max_length or a smaller batch",
            )
        deadline = time.monotonic() + timeout
        while (allocation := self.try_allocate(blocks, batch, max_length)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PetalError(
                    "busy",
                    f"no KV-cache room for {need} token-blocks within {timeout:.0f}s ({self.free_units} of "
                    f"{self.units} free); retry later or use another server",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), left)
        return allocation

    def free(self, allocation: Allocation) -> None:
        """Give an allocation's range back (idempotent) and wake waiting sessions."""
        if allocation not in self._live:
            return
        self._live.discard(allocation)
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
