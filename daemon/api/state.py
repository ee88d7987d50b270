"""What the control API holds between requests: ``ApiState`` (the router and the loaded model frontends) and
``NodeLike``, exactly what the API uses of the daemon's node, so that the API never imports ``node.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from aiohttp import web

from petal.daemon.api.frontend import ModelFrontend, resolve_model
from petal.daemon.config import Config
from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.routing.router import Router
from petal.daemon.serving.host import Host
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import MODEL_HINT


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
        self._frontends: dict[str, ModelFrontend] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    @property
    def router(self) -> Router:
        if self._router is None:
            # --codec: this daemon's wire codec
            self._router = Router(self.node.transport, self.node.dht, codec=self.node.config.codec)
        return self._router

    async def frontend(self, model: object) -> ModelFrontend:
        """The model's frontend, loaded once (in a thread: reading weights must not stall the socket)."""
        if not isinstance(model, str) or not model:
            raise PetalError("bad_request", MODEL_HINT)
        lock = self._loading.setdefault(model, asyncio.Lock())
        async with lock:
            if model not in self._frontends:
                path = resolve_model(model)
                self._frontends[model] = await asyncio.to_thread(ModelFrontend, path)
            return self._frontends[model]

    async def close(self) -> None:
        if self._router is not None:
            await self._router.close()
            self._router = None


STATE_KEY = web.AppKey("api_state", ApiState)
