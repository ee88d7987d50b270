"""What the control API holds between requests: ``ApiState`` (the router and the loaded model frontends) and
``NodeLike``, exactly what the API uses of the daemon's node, so that the API never imports ``node.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from petal.daemon.config import Config
from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.routing.swarm import ModelShape
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import MODEL_HINT

if TYPE_CHECKING:  # these load torch: imported where first used, so a daemon that hosts nothing starts without it
    import torch

    from petal.daemon.api.frontend import ModelFrontend
    from petal.daemon.routing.router import Router
    from petal.daemon.serving.host import Host

log = logging.getLogger("petal.api")

MAX_FRONTENDS = 3
"""Model frontends (tokenizer, embeddings, head) kept loaded; the least recently used is dropped first."""
MAX_SHAPES = 16
"""Local model shapes (fingerprint, block count) remembered for checking DHT records."""

LoadKey = tuple[str, int, int]
"""A model dir as loaded: its canonical path and its config.json's mtime and size (a replaced model reloads)."""


class NodeLike(Protocol):
    """The parts of ``petal.daemon.node.Node`` the control API uses."""

    @property
    def config(self) -> Config: ...

    @property
    def peer_id(self) -> str: ...

    @property
    def dht(self) -> SwarmDHT: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def host(self) -> Host:
        """What this daemon serves: ``serve(plan)``, ``unserve(model)`` (the /v1/serve endpoints)."""
        ...

    def status(self) -> dict[str, Any]: ...

    async def announce(self, key: str, value: dict[str, Any]) -> int:
        """Announce ``value`` under ``key`` and keep re-announcing it until withdrawn; returns the nodes storing it."""
        ...

    async def withdraw(self, key: str) -> None: ...


class ApiState:
    """What the endpoints share inside one daemon: the node, the router and the loaded model frontends."""

    def __init__(self, node: NodeLike) -> None:
        self.node = node
        self._router: Router | None = None
        # Keyed by the model dir, not by the name asked for: aliases ("smollm2", "smollm2/.", a path) share one.
        self._frontends: OrderedDict[LoadKey, ModelFrontend] = OrderedDict()
        self._loading: dict[LoadKey, asyncio.Lock] = {}  # only while a load runs
        self._shapes: OrderedDict[LoadKey, ModelShape] = OrderedDict()
        self.max_frontends = MAX_FRONTENDS

    @property
    def router(self) -> Router:
        if self._router is None:
            from petal.daemon.routing.router import Router  # start-up: torch loads on the first routed request

            # --codec: this daemon's wire codec; DHT records are checked against the local copies of models
            self._router = Router(
                self.node.transport,
                self.node.dht,
                codec=self.node.config.codec,
                slow_link_mbit=self.node.config.slow_link_mbit,
                local_shape=self.local_shape,
                spot_check_rate=self.node.config.spot_check_rate,
                pipeline_min_tokens=self.node.config.pipeline_min_tokens,
                local_forward=self.local_forward,
            )
        return self._router

    @property
    def kept(self) -> dict[str, int]:
        """How many entries each per-model table holds (bounded whatever names callers send; for tests)."""
        views = self._router.views if self._router is not None else 0
        return {
            "frontends": len(self._frontends),
            "loading": len(self._loading),
            "shapes": len(self._shapes),
            "views": views,
        }

    async def frontend(self, model: object) -> ModelFrontend:
        """The model's frontend, loaded once per model dir (in a thread: reading weights must not stall the socket).

        A name that does not resolve to a model dir leaves nothing behind; at most ``max_frontends`` stay loaded.
        """
        from petal.daemon.api.frontend import ModelFrontend, resolve_model  # start-up: torch loads on first use

        if not isinstance(model, str) or not model:
            raise PetalError("bad_request", MODEL_HINT)
        key = _load_key(resolve_model(model))
        loaded = self._frontends.get(key)
        if loaded is not None:
            self._frontends.move_to_end(key)
            return loaded
        lock = self._loading.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                loaded = self._frontends.get(key)
                if loaded is None:
                    loaded = await asyncio.to_thread(ModelFrontend, key[0])
                    self._frontends[key] = loaded
                    self._shapes[key] = ModelShape(loaded.info.fingerprint, loaded.info.num_blocks)
                    self._trim()
                return loaded
        finally:
            if not lock.locked() and self._loading.get(key) is lock:
                del self._loading[key]

    def _trim(self) -> None:
        while len(self._frontends) > self.max_frontends:
            self._frontends.popitem(last=False)
        while len(self._shapes) > MAX_SHAPES:
            self._shapes.popitem(last=False)

    async def local_shape(self, model: str) -> ModelShape | None:
        """The fingerprint and block count of this daemon's copy of ``model``, or None if it has none."""
        from petal.daemon.api.frontend import resolve_model  # start-up: torch loads on first use
        from petal.kernels.store import open_model

        try:
            key = _load_key(resolve_model(model))
        except (PetalError, OSError, ValueError, RuntimeError):
            return None
        shape = self._shapes.get(key)
        if shape is None:
            try:
                info = await asyncio.to_thread(open_model, key[0])
                shape = ModelShape(await asyncio.to_thread(lambda: info.fingerprint), info.num_blocks)
            except Exception as e:  # noqa: BLE001 - a broken local copy is no copy: the swarm's records decide
                log.debug("cannot read the local copy of %s: %s", model, e)
                return None
            self._shapes[key] = shape
            self._trim()
        self._shapes.move_to_end(key)
        return shape

    async def local_forward(
        self,
        model: str,
        fingerprint: str,
        start: int,
        end: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Blocks [start, end) of ``model`` run by this daemon's own server: the trusted reference of spot checks and
        ``petalctl verify``; None when it does not host exactly those weights and blocks."""
        server = self.node.host.server_of(model)
        if (
            server is None
            or server.fingerprint != fingerprint
            or not server.span.start <= start < end <= server.span.end
        ):
            return None
        return await server.forward_local(start, end, hidden, mask, prompts)

    async def close(self) -> None:
        if self._router is not None:
            await self._router.close()
            self._router = None


def _load_key(path: Path) -> LoadKey:
    """The canonical dir of a resolved model and its config.json's mtime and size."""
    path = path.resolve()
    st = (path / "config.json").stat()
    return str(path), st.st_mtime_ns, st.st_size


STATE_KEY = web.AppKey("api_state", ApiState)
