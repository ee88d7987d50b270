"""`Host`: the one owner of what this daemon serves. The API and the node call `plan`/`serve`/`unserve`/`stop`, the
rebalancer calls `move`; nobody else holds a block server.

Everything it needs comes in through its constructor, typed by Protocol: the transport the block servers listen on,
the DHT it reads the swarm from, and the node's announcer (which keeps re-announcing what a server publishes).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.errors import ServeError
from petal.daemon.serving.plan import Progress, ServePlan, load_span, plan_serving
from petal.daemon.serving.rebalancer import Rebalancer
from petal.daemon.serving.settings import ServeSettings
from petal.daemon.serving.throughput import cached_throughput, read_cached_throughput
from petal.daemon.serving.worker import INFERENCE, TRAINING
from petal.protocol.records import MODELS_KEY

log = logging.getLogger("petal.server")

PROVISIONAL_THROUGHPUT = 1.0
"""Tokens/s a server announces between going online and its first throughput measurement (about a second): low,
so routers weighting by throughput prefer measured servers meanwhile, yet positive, so the blocks count as served."""


class Announcer(Protocol):
    """The node's side of announcing: `announce` publishes now and keeps re-announcing until `withdraw`."""

    async def announce(self, key: str, value: dict[str, Any]) -> object: ...

    async def withdraw(self, key: str) -> None: ...


@dataclass(frozen=True)
class HostedSpan:
    """One span this daemon serves."""

    model: str
    start: int
    end: int


@dataclass
class _Hosted:
    plan: ServePlan
    server: BlockServer
    rebalancer: Rebalancer | None = None


class Host:
    """What this daemon serves (in practice one span of one model: the block protocols have one handler each)."""

    def __init__(
        self,
        *,
        transport: Transport,
        dht: SwarmDHT,
        announcer: Announcer,
        peer_id: str,
        settings: ServeSettings,
        state_dir: Path,
        rebalance_period: float,
    ) -> None:
        self.transport = transport
        self.dht = dht
        self.announcer = announcer
        self.peer_id = peer_id
        self.settings = settings
        self.state_dir = state_dir
        self.rebalance_period = rebalance_period
        self._hosted: dict[str, _Hosted] = {}

    async def plan(self, serve: str, *, blocks: str | None = None, num_blocks: int | None = None) -> ServePlan:
        """See `plan_serving`; raises ServeError with a message that says what to change."""
        return await plan_serving(self.dht, self.settings, serve, blocks=blocks, num_blocks=num_blocks)

    async def serve(self, plan: ServePlan, progress: Progress | None = None) -> BlockServer:
        """Load, measure, serve and announce `plan`'s span; with `plan.rebalance`, also start its Rebalancer."""
        if served := self.served():
            raise ServeError(f"this daemon already serves {served[0].model}; unserve it first")
        server = await self._load(plan, plan.start, plan.end, progress)
        hosted = self._hosted[plan.info.name] = _Hosted(plan, server)
        if plan.rebalance:
            info = plan.info
            hosted.rebalancer = Rebalancer(
                self, self.dht, self.peer_id, info.name, info.num_blocks, self.rebalance_period
            )
            hosted.rebalancer.start()
        return server

    def served(self) -> list[HostedSpan]:
        return [HostedSpan(m, h.server.span.start, h.server.span.end) for m, h in self._hosted.items()]

    def server_of(self, model: str) -> BlockServer | None:
        hosted = self._hosted.get(model)
        return None if hosted is None else hosted.server

    def status(self) -> list[dict[str, Any]]:
        """What each hosted span is doing now (JSON-able)."""
        return [
            {
                "model": m,
                "start": h.server.span.start,
                "end": h.server.span.end,
                "throughput": h.server.throughput,
                "sessions": h.server.sessions,
                "cache_tokens_left": h.server.cache_tokens_left,
                "rebalancing": h.rebalancer is not None,
                "inference_steps": h.server.jobs.submitted[INFERENCE],
                "training_calls": h.server.jobs.submitted[TRAINING],
            }
            for m, h in self._hosted.items()
        ]

    async def move(self, model: str, span: tuple[int, int]) -> None:
        """Serve `span` of `model` instead of its current span (stopped first: its sessions fail over)."""
        hosted = self._hosted.get(model)
        if hosted is None:
            return
        await hosted.server.stop()
        server = await self._load(hosted.plan, *span)
        if self._hosted.get(model) is not hosted:  # unserved while loading
            await server.stop()
            return
        hosted.server = server

    async def unserve(self, model: str) -> list[HostedSpan]:
        """Stop serving `model`: end its rebalancer, drain it (`BlockServer.drain`: announced as leaving, no new
        sessions, open ones finish within the drain timeout), withdraw its blocks (they show as offline), free its
        memory."""
        hosted = self._hosted.pop(model, None)
        if hosted is None:
            return []
        stopped = HostedSpan(model, hosted.server.span.start, hosted.server.span.end)
        await self._stop(hosted, drain=True)
        try:
            await asyncio.wait_for(self.announcer.withdraw(MODELS_KEY), timeout=3.0)
        except Exception as e:  # noqa: BLE001 - the entry expires on its own
            log.info("could not withdraw %s from %s: %s", model, MODELS_KEY, e)
        del hosted
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [stopped]

    async def stop(self, drain: bool = False) -> None:
        """Stop everything served (the daemon is shutting down: the node withdraws what is left); with `drain`, each
        server first lets its open sessions finish (`BlockServer.drain`), all of them at once."""
        hosted, self._hosted = list(self._hosted.values()), {}
        await asyncio.gather(*(self._stop(h, drain=drain) for h in hosted))

    @staticmethod
    async def _stop(hosted: _Hosted, drain: bool = False) -> None:
        if hosted.rebalancer is not None:  # first, so that it cannot move the server being stopped
            await hosted.rebalancer.stop()
        if drain:
            await hosted.server.drain()
        else:
            await hosted.server.stop()

    async def _load(self, plan: ServePlan, start: int, end: int, progress: Progress | None = None) -> BlockServer:
        info, settings = plan.info, plan.settings
        log.info("loading %s blocks [%d, %d) from %s", info.name, start, end, info.path)
        span = await asyncio.to_thread(load_span, info, start, end, settings, progress)
        server = BlockServer(
            span,
            model=info.name,
            fingerprint=info.fingerprint,
            family=info.family,
            num_blocks=info.num_blocks,
            transport=self.transport,
            settings=settings,
            announce=self.announcer.announce,
            withdraw=self.announcer.withdraw,
            dht=self.dht,
        )
        # Online as soon as loaded: with the figure cached by an earlier start, or (first start of this span on this
        # hardware) with PROVISIONAL_THROUGHPUT until measured, which takes a second or more; then re-announced.
        cached = await asyncio.to_thread(read_cached_throughput, server, self.state_dir)
        server.throughput = PROVISIONAL_THROUGHPUT if cached is None else cached
        await server.start()
        if progress is not None:
            progress({"event": "measuring", "model": info.name, "start": start, "end": end})
        if cached is None:
            try:
                server.throughput = await asyncio.to_thread(cached_throughput, server, self.state_dir)
            except BaseException:
                await server.stop()
                raise
            await server.republish()
        if progress is not None:
            event = {"event": "serving", "model": info.name, "start": start, "end": end}
            progress({**event, "throughput": round(server.throughput, 3)})
        return server
