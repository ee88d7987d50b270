"""The control API server: ``make_app`` wires every endpoint module's routes into one aiohttp app, and
``ControlServer`` serves it on the local Unix socket (mode 0660), optionally also on a TCP port for browsers.

Every error is JSON ``{"error": {"code", "message"}}`` with a fitting HTTP status (errors.py); no request can take
the daemon down. The endpoints see the node only through ``NodeLike`` (state.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from aiohttp import web

from petal.daemon.api.auth import add_auth_routes, guard_tcp
from petal.daemon.api.bodies import MAX_REQUEST_BYTES
from petal.daemon.api.dashboard import add_dashboard_routes
from petal.daemon.api.errors import JsonErrorRunner, errors_as_json
from petal.daemon.api.lazy import LazyRoutes
from petal.daemon.api.metrics import ApiMetrics, add_metrics_routes
from petal.daemon.api.node_routes import add_node_routes
from petal.daemon.api.state import STATE_KEY, ApiState, NodeLike
from petal.daemon.config import ConfigError, parse_http_address, prepare_socket_dir
from petal.protocol.errors import PetalError

log = logging.getLogger("petal.control")


async def not_found(request: web.Request) -> web.Response:
    raise PetalError("not_found", f"no endpoint {request.method} {request.path}; see docs/api.yaml")


def make_app(node: NodeLike, *, lazy: bool = False) -> web.Application:
    """Every endpoint of the socket API; the router (and open sessions, and a load in progress) close with the app.

    The endpoints that need torch (models, generate, OpenAI, tensors, session streams, serve) live in
    ``petal.daemon.api.routes``; with ``lazy`` that module is imported on the first request that reaches it (in a
    thread, so the socket keeps answering), which lets a daemon that hosts nothing answer and send READY=1 without
    loading torch. Without ``lazy`` it is imported here.
    """
    metrics = ApiMetrics()  # outermost: it times every request and sees every answer, errors included
    app = web.Application(
        middlewares=[metrics.middleware, errors_as_json, guard_tcp], client_max_size=MAX_REQUEST_BYTES
    )
    state = ApiState(node)
    app[STATE_KEY] = state
    heavy = LazyRoutes(node, state)

    async def cleanup(_: web.Application) -> None:
        await heavy.close()
        await state.close()

    async def shutdown(_: web.Application) -> None:
        await heavy.shutdown()  # closes the session streams before aiohttp waits for open handlers

    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    add_auth_routes(app, node.config)  # over TCP (--http): Host, Origin, token and content-type checks first
    add_node_routes(app)
    add_dashboard_routes(app)  # the page at /: static files only; the data it polls is in the lazy routes
    add_metrics_routes(app, metrics)  # torch-free: reads the DHT, not the router
    app.router.register_resource(heavy)  # everything else, in petal.daemon.api.routes
    app.router.add_route("*", "/{tail:.*}", not_found)
    if not lazy:

        async def load_now(_: web.Application) -> None:
            await heavy.load()

        app.on_startup.append(load_now)
    return app


class ControlServer:
    """The control API on the node's socket (and ``--http`` address), from ``start`` until ``stop``."""

    def __init__(self, node: NodeLike, *, lazy: bool = False) -> None:
        self.node = node
        self.lazy = lazy  # make_app's: the torch-using endpoints load on first use
        self.socket_path = Path(node.config.socket)
        self._runner: web.AppRunner | None = None
        self._listening = False  # only a socket this server bound is removed at stop, never another's

    async def start(self) -> None:
        prepare_socket_dir(self.socket_path)  # ours, 0700 (0750 system), or ConfigError saying what to do
        if self.socket_path.exists():
            if await _socket_alive(self.socket_path):
                raise ConfigError(f"another petald already listens on {self.socket_path}; stop it or pass --socket")
            self.socket_path.unlink()  # left over from a crash
        self._runner = JsonErrorRunner(make_app(self.node, lazy=self.lazy), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()
        self._listening = True
        os.chmod(self.socket_path, 0o660)
        if self.node.config.http:
            host, port = parse_http_address(self.node.config.http)
            try:
                await web.TCPSite(self._runner, host, port).start()
            except OSError as e:
                raise ConfigError(
                    f"cannot listen on --http {self.node.config.http} ({e.strerror}); choose another"
                ) from None
            log.info("control API also on http://%s (token: `petalctl token`)", self.node.config.http)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._listening:
            self.socket_path.unlink(missing_ok=True)
            self._listening = False


async def _socket_alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout=1.0)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True
