"""``LazyRoutes``: the control API's torch-using endpoints, imported on the first request that reaches them.

A daemon that hosts nothing opens its socket and sends READY=1 before torch (about 1-3 s of imports) is loaded:
``make_app`` registers this one aiohttp resource after the torch-free routes (status, DHT, auth) and before the
"no such endpoint" catch-all. The first request it sees imports ``petal.daemon.api.routes`` in a thread (the loop
keeps answering /v1/status meanwhile), builds an inner application with those routes and resolves the request
there, as aiohttp does for a sub-application without a prefix; later requests resolve at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource, AbstractRoute, UrlMappingMatchInfo, _InfoDict
from yarl import URL

from petal.daemon.api.state import STATE_KEY, ApiState, NodeLike

if TYPE_CHECKING:
    from aiohttp.web_urldispatcher import _Resolve

log = logging.getLogger("petal.control")

AddRoutes = Callable[[web.Application, NodeLike], None]


def _import_routes() -> AddRoutes:
    from petal.daemon.api.routes import add_routes  # start-up: torch loads on the first request that needs it

    return add_routes


class LazyRoutes(AbstractResource):
    """Every endpoint of ``petal.daemon.api.routes``, loaded on first use (or by ``load``)."""

    def __init__(self, node: NodeLike, state: ApiState) -> None:
        super().__init__(name=None)
        self._node = node
        self._state = state
        self._inner: web.Application | None = None
        self._lock = asyncio.Lock()
        self._shut_down = False

    @property
    def loaded(self) -> bool:
        return self._inner is not None

    async def load(self) -> web.Application:
        """Import the routes module (in a thread: torch takes seconds) and start the inner app, once."""
        if self._inner is not None:
            return self._inner
        async with self._lock:
            if self._inner is None:
                add_routes = await asyncio.to_thread(_import_routes)
                inner = web.Application()
                inner[STATE_KEY] = self._state
                add_routes(inner, self._node)
                inner.freeze()
                await inner.startup()
                self._inner = inner
                log.debug("control API: torch-using endpoints loaded")
        return self._inner

    async def shutdown(self) -> None:
        """The inner app's on_shutdown, run from the outer app's: before aiohttp waits for open handlers, so that
        long-lived ones (session streams) are closed first and do not hold the daemon's stop."""
        if self._inner is not None and not self._shut_down:
            self._shut_down = True
            await self._inner.shutdown()

    async def close(self) -> None:
        if self._inner is not None:
            await self.shutdown()
            inner, self._inner = self._inner, None
            await inner.cleanup()

    async def resolve(self, request: web.Request) -> _Resolve:
        inner = await self.load()
        match = await inner.router.resolve(request)
        exception = match.http_exception
        if exception is not None:  # not one of ours: 405 says which methods the path takes, 404 falls through
            if isinstance(exception, web.HTTPMethodNotAllowed):
                return None, set(exception.allowed_methods)
            return None, set()
        assert isinstance(match, UrlMappingMatchInfo)
        match.add_app(inner)  # request.app is the inner app (its keys), as for an aiohttp sub-application
        return match, set()

    @property
    def canonical(self) -> str:
        return "/"

    def url_for(self, **kwargs: str) -> URL:
        raise RuntimeError("the lazily loaded endpoints have no URL of their own")

    def add_prefix(self, prefix: str) -> None:
        raise RuntimeError("LazyRoutes cannot live in a prefixed sub-application")

    def get_info(self) -> _InfoDict:
        return {"path": "/"}

    def raw_match(self, path: str) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._inner.router.routes()) if self._inner is not None else 0

    def __iter__(self) -> Iterator[AbstractRoute]:
        return iter(self._inner.router.routes()) if self._inner is not None else iter(())
