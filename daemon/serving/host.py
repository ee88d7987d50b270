"""`Host`: the one owner of what this daemon serves. The API and the node call `plan`/`serve`/`unserve`/`stop`, the
rebalancer calls `move`; nobody else holds a block server.

A daemon may serve several spans: of different models, or disjoint spans of one model. Each is its own `BlockServer`
(its own compute thread and its own KV pool of `max_cache_tokens`, so one span's sessions never take another's
cache), announced under its blocks' keys; the block protocols are registered once per transport and route each
request to its span (`petal.daemon.serving.dispatch`). The models key holds one entry per signer, so the Host
announces there one entry listing every model it serves (`models_value`).

Everything it needs comes in through its constructor, typed by Protocol: the transport the block servers listen on,
the DHT it reads the swarm from, and the node's announcer (which keeps re-announcing what a server publishes).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.serving.adapters import load_adapters
from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.errors import ServeError
from petal.daemon.serving.plan import Progress, ServePlan, load_span, plan_serving
from petal.daemon.serving.rebalancer import Rebalancer
from petal.daemon.serving.settings import DTYPES, ServeSettings
from petal.daemon.serving.throughput import cached_throughput, read_cached_throughput
from petal.daemon.serving.worker import INFERENCE, TRAINING
from petal.protocol.records import (
    MAX_MODELS_PER_ENTRY,
    MODELS_KEY,
    ModelRecord,
    RecordError,
    block_key,
    check_announcement,
    models_value,
)

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
    adapters: tuple[tuple[str, Path], ...] = ()
    rebalancer: Rebalancer | None = None


class Host:
    """What this daemon serves: spans of one or several models, each a `BlockServer`."""

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
        self._hosted: list[_Hosted] = []
        self._models: dict[str, dict[str, Any]] = {}  # model -> its ModelRecord value, as its servers announce it

    async def plan(self, serve: str, *, blocks: str | None = None, num_blocks: int | None = None) -> ServePlan:
        """See `plan_serving`; raises ServeError with a message that says what to change."""
        return await plan_serving(self.dht, self.settings, serve, blocks=blocks, num_blocks=num_blocks)

    async def serve(
        self,
        plan: ServePlan,
        progress: Progress | None = None,
        adapters: Iterable[tuple[str, Path]] = (),
        strict: bool = True,
    ) -> BlockServer:
        """Load, measure, serve and announce `plan`'s span beside what is served already, with the LoRA `adapters`
        (name, PEFT dir) hosted on it (without `strict`, those that do not fit its layers are left out: see
        `load_adapters`); with `plan.rebalance`, also start its Rebalancer. Raises ServeError (saying
        what to change) for a span overlapping one of the same model, a second model of the same name with other
        weights, too many models, or a second rebalancing span."""
        info = plan.info
        self.check(plan)
        dirs = tuple(adapters)
        server = await self._load(plan, plan.start, plan.end, progress, dirs, strict)
        hosted = _Hosted(plan, server, tuple((n, p) for n, p in dirs if n in server.adapters))
        self._hosted.append(hosted)
        if plan.rebalance:
            hosted.rebalancer = Rebalancer(
                self, self.dht, self.peer_id, info.name, info.num_blocks, self.rebalance_period
            )
            hosted.rebalancer.start()
        return hosted.server

    def check(self, plan: ServePlan) -> None:
        """Raise ServeError unless `plan` can be served beside what is served now (see `serve`)."""
        info = plan.info
        same = [h for h in self._hosted if h.plan.info.name == info.name]
        for h in same:
            span = h.server.span
            if h.plan.info.fingerprint != info.fingerprint:
                raise ServeError(
                    f"this daemon serves other weights named {info.name} (fingerprint {h.plan.info.fingerprint}, "
                    f"not {info.fingerprint}); unserve them first"
                )
            if span.start < plan.end and plan.start < span.end:
                raise ServeError(
                    f"blocks [{plan.start}, {plan.end}) of {info.name} overlap the span [{span.start}, {span.end}) "
                    "this daemon serves already; pick blocks outside it"
                )
            if plan.rebalance or h.rebalancer is not None:
                raise ServeError(
                    f"this daemon serves {info.name} already; a second span of it needs fixed blocks (--blocks A:B) "
                    "on both, since a span chosen by the swarm's needs may move onto the other"
                )
        models = {h.plan.info.name for h in self._hosted} | {info.name}
        if len(models) > MAX_MODELS_PER_ENTRY:
            raise ServeError(
                f"this daemon serves {len(models) - 1} models already, the most one daemon announces; "
                "unserve one or start another daemon"
            )

    def served(self) -> list[HostedSpan]:
        return [HostedSpan(h.plan.info.name, h.server.span.start, h.server.span.end) for h in self._hosted]

    def server_of(self, model: str) -> BlockServer | None:
        """The server of `model` (the one a rebalancer watches, if any; else the first span of it)."""
        hosted = sorted((h for h in self._hosted if h.plan.info.name == model), key=lambda h: h.rebalancer is None)
        return hosted[0].server if hosted else None

    def servers(self) -> list[BlockServer]:
        """Every block server, in the order served."""
        return [h.server for h in self._hosted]

    def status(self) -> list[dict[str, Any]]:
        """What each hosted span is doing now (JSON-able)."""
        return [
            {
                "model": h.plan.info.name,
                "start": h.server.span.start,
                "end": h.server.span.end,
                "throughput": h.server.throughput,
                "sessions": h.server.sessions,
                "cache_tokens_left": h.server.cache_tokens_left,
                "rebalancing": h.rebalancer is not None,
                "inference_steps": h.server.jobs.submitted[INFERENCE],
                "training_calls": h.server.jobs.submitted[TRAINING],
                "forward_runs": h.server.compute.forwards,  # span forwards, a recomputing backward's included
                "backward_recomputed": h.server.recomputed,  # backwards whose kept forward was gone
                **h.server.jobs.batch_stats(),  # continuous batching: batches of > 1 job so far
                **h.server.activations.stats(),
            }
            for h in self._hosted
        ]

    async def move(self, model: str, span: tuple[int, int]) -> None:
        """Serve `span` of `model` instead of its current span (stopped first: its sessions fail over)."""
        hosted = next((h for h in self._hosted if h.plan.info.name == model and h.rebalancer is not None), None)
        if hosted is None:
            return
        await hosted.server.stop()
        server = await self._load(hosted.plan, *span, adapters=hosted.adapters)
        if hosted not in self._hosted:  # unserved while loading
            await server.stop()
            return
        hosted.server = server

    def find(self, model: str, start: int | None = None) -> list[HostedSpan]:
        """The spans of `model` served here (only the one starting at `start` when given)."""
        return [s for s in self.served() if s.model == model and (start is None or s.start == start)]

    async def unserve(self, model: str, start: int | None = None) -> list[HostedSpan]:
        """Stop serving `model` (its span starting at `start` when given; ServeError if it has several and none is
        named): end its rebalancer, drain it (`BlockServer.drain`: announced as leaving, no new sessions, open ones
        finish within the drain timeout), withdraw its blocks (they show as offline), free its memory."""
        hosted = [
            h for h in self._hosted if h.plan.info.name == model and (start is None or h.server.span.start == start)
        ]
        if not hosted:
            return []
        if len(hosted) > 1:
            spans = ", ".join(f"{h.server.span.start}:{h.server.span.end}" for h in hosted)
            raise ServeError(f"this daemon serves several spans of {model} ({spans}); name the one to stop")
        [one] = hosted
        self._hosted.remove(one)
        stopped = HostedSpan(model, one.server.span.start, one.server.span.end)
        await self._stop(one, drain=True)
        if not any(h.plan.info.name == model for h in self._hosted):
            self._models.pop(model, None)
            try:
                if self._models:  # the other models stay listed
                    await asyncio.wait_for(self._announce_models(), timeout=3.0)
                else:
                    await asyncio.wait_for(self.announcer.withdraw(MODELS_KEY), timeout=3.0)
            except Exception as e:  # noqa: BLE001 - the entry expires on its own
                log.info("could not withdraw %s from %s: %s", model, MODELS_KEY, e)
        del one, hosted
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return [stopped]

    async def stop(self, drain: bool = False) -> None:
        """Stop everything served (the daemon is shutting down: the node withdraws what is left); with `drain`, each
        server first lets its open sessions finish (`BlockServer.drain`), all of them at once."""
        hosted, self._hosted = list(self._hosted), []
        await asyncio.gather(*(self._stop(h, drain=drain) for h in hosted))

    async def _announce(self, key: str, value: dict[str, Any]) -> object:
        """What block servers announce through: the models key gets one entry listing every model served here."""
        if key != MODELS_KEY:
            return await self.announcer.announce(key, value)
        record = ModelRecord.parse(value)
        if record is None:
            raise RecordError(f"not a model record: {value!r:.80}")
        self._models[record.name] = value
        return await self._announce_models()

    async def _announce_models(self) -> object:
        records = [r for v in self._models.values() if (r := ModelRecord.parse(v)) is not None]
        return await self.announcer.announce(MODELS_KEY, models_value(records))

    @staticmethod
    async def _stop(hosted: _Hosted, drain: bool = False) -> None:
        if hosted.rebalancer is not None:  # first, so that it cannot move the server being stopped
            await hosted.rebalancer.stop()
        if drain:
            await hosted.server.drain()
        else:
            await hosted.server.stop()

    async def _load(
        self,
        plan: ServePlan,
        start: int,
        end: int,
        progress: Progress | None = None,
        adapters: tuple[tuple[str, Path], ...] = (),
        strict: bool = True,
    ) -> BlockServer:
        info, settings = plan.info, plan.settings
        log.info("loading %s blocks [%d, %d) from %s", info.name, start, end, info.path)
        span = await asyncio.to_thread(load_span, info, start, end, settings, progress)
        device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
        hosted_adapters = (
            await asyncio.to_thread(functools.partial(load_adapters, strict=strict), adapters, span, device, dtype)
            if adapters
            else {}
        )
        server = BlockServer(
            span,
            model=info.name,
            fingerprint=info.fingerprint,
            family=info.family,
            num_blocks=info.num_blocks,
            transport=self.transport,
            settings=settings,
            announce=self._announce,
            withdraw=self.announcer.withdraw,
            dht=self.dht,
            adapters=hosted_adapters,
        )
        if hosted_adapters:  # the names travel in every DHT record of the span: they must fit one
            try:
                check_announcement(block_key(info.name, start), server.record("online"))
            except RecordError as e:
                raise ServeError(
                    f"the adapter names {sorted(hosted_adapters)} do not fit this span's DHT record ({e.message}); "
                    "host fewer adapters or give them shorter names (NAME=DIR)"
                ) from None
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
            progress({**event, "throughput": round(server.throughput, 3), "adapters": sorted(server.adapters)})
        return server
