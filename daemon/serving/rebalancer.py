"""Moving a span where the swarm needs it (paper §3.2): `Rebalancer` asks `should_move` every period and, when it
says so, asks its `Mover` (the `Host`) to move. It owns only its timer; the Host owns what is served.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.placement import should_move
from petal.daemon.serving.plan import swarm_entries

log = logging.getLogger("petal.server")


class Mover(Protocol):
    """What a Rebalancer needs of its owner: the server it watches, and a way to move that server."""

    def server_of(self, model: str) -> BlockServer | None: ...

    async def move(self, model: str, span: tuple[int, int]) -> None: ...


class Rebalancer:
    """Every `period` seconds (± 30% jitter, so servers never all move at once) asks `should_move` and moves.

    A move stops the old server first (withdrawing its entries; its sessions fail over on the client side).
    """

    def __init__(self, mover: Mover, dht: SwarmDHT, peer_id: str, model: str, num_blocks: int, period: float) -> None:
        self.mover, self.dht, self.peer_id = mover, dht, peer_id
        self.model, self.num_blocks, self.period = model, num_blocks, period
        self._task: asyncio.Task[None] | None = None
        self.moves = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="rebalance")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period * random.uniform(0.7, 1.3))
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001 - keep serving; the next round tries again
                log.warning("rebalancing check failed: %s", e)

    async def check(self) -> bool:
        """Move if `should_move` says so; True if it moved."""
        current = self.mover.server_of(self.model)
        if current is None:
            return False
        total = self.num_blocks
        entries = await swarm_entries(self.dht, self.model, total)
        span = (current.span.start, current.span.end)
        target = should_move(entries, self.peer_id, span, current.throughput, total)
        if target is None:
            return False
        log.info("moving from blocks [%d, %d) to [%d, %d): the swarm's slowest blocks are there", *span, *target)
        await self.mover.move(self.model, target)
        self.moves += 1
        return True
