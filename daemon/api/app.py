"""The control API: aiohttp on the local Unix socket (mode 0660), optionally also on a TCP port for browsers.

Every error is JSON `{"error": {"code", "message"}}` with a fitting HTTP status; no request can take the daemon down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from petal.daemon.node import Node

log = logging.getLogger("petal.control")

MAX_REQUEST_BYTES = 64 * 1024 * 1024
NODE_KEY = web.AppKey("node", object)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, "bad_request" if e.status < 500 else "internal", e.reason or str(e))
    except Exception as e:
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(500, "internal", f"internal error: {type(e).__name__}: {e}; see the daemon log")


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(
            400, "bad_request", f"request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "request body must be a JSON object")
    return body


def node_of(request: web.Request) -> Node:
    return request.app[NODE_KEY]  # type: ignore[return-value]


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(node_of(request).status())


async def get_dht(request: web.Request) -> web.Response:
    entries = await node_of(request).dht.get(request.match_info["key"])
    return web.json_response(
        {
            "entries": [
                {
                    "peer_id": e.peer_id,
                    "state": e.state,
                    "value": e.value,
                    "issued_at": e.issued_at,
                    "expires_at": e.expires_at,
                }
                for e in entries
            ]
        }
    )


async def put_dht(request: web.Request) -> web.Response:
    """Low-level: announce this node's own signed entry under a key and keep it alive (until DELETE or stop)."""
    from petal.daemon.node import MAX_ANNOUNCED_VALUE_BYTES

    body = await read_json(request)
    value = body.get("value")
    if not isinstance(value, dict):
        raise ApiError(400, "bad_request", 'body must be {"value": {...}}')
    if len(json.dumps(value)) > MAX_ANNOUNCED_VALUE_BYTES:
        raise ApiError(
            413, "too_large", f"value is over {MAX_ANNOUNCED_VALUE_BYTES} bytes; DHT entries must stay small"
        )
    stored = await node_of(request).announce(request.match_info["key"], value)
    return web.json_response({"stored_on": stored})


async def delete_dht(request: web.Request) -> web.Response:
    await node_of(request).withdraw(request.match_info["key"])
    return web.json_response({"withdrawn": True})


async def not_found(request: web.Request) -> web.Response:
    raise ApiError(404, "not_found", f"no endpoint {request.method} {request.path}; see docs/api.yaml")


def make_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_REQUEST_BYTES)
    app[NODE_KEY] = node
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/dht/{key}", get_dht)
    app.router.add_put("/v1/dht/{key}", put_dht)
    app.router.add_delete("/v1/dht/{key}", delete_dht)
    from petal.daemon.api.generate import add_routes
    from petal.daemon.api.serve import add_serve_routes
    from petal.daemon.api.tensors import add_tensor_routes

    add_routes(app, node)
    add_tensor_routes(app)
    add_serve_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


class ControlServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.socket_path = Path(node.config.socket)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            if await _socket_alive(self.socket_path):
                raise RuntimeError(f"another petald already listens on {self.socket_path}; stop it or pass --socket")
            self.socket_path.unlink()  # left over from a crash
        self._runner = web.AppRunner(make_app(self.node), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()
        os.chmod(self.socket_path, 0o660)
        if self.node.config.http:
            host, _, port = self.node.config.http.rpartition(":")
            await web.TCPSite(self._runner, host or "127.0.0.1", int(port)).start()
            log.info("control API also on http://%s", self.node.config.http)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        self.socket_path.unlink(missing_ok=True)


async def _socket_alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout=1.0)
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True
