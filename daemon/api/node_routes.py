"""Control API endpoints about this node itself: /v1/status, and /v1/dht/{key} to read, announce or withdraw raw
DHT entries (low-level; the block servers announce their own records).
"""

from __future__ import annotations

import json
from typing import Final

from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.state import STATE_KEY
from petal.protocol.errors import PetalError

MAX_ANNOUNCED_VALUE_BYTES: Final = 2048
"""Largest value (as JSON) PUT /v1/dht/{key} announces: DHT entries must stay well under a UDP datagram."""


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].node.status())


async def get_dht(request: web.Request) -> web.Response:
    entries = await request.app[STATE_KEY].node.dht.get(request.match_info["key"])
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
    body = await read_json(request)
    value = body.get("value")
    if not isinstance(value, dict):
        raise PetalError("bad_request", 'body must be {"value": {...}}')
    if len(json.dumps(value)) > MAX_ANNOUNCED_VALUE_BYTES:
        raise PetalError("too_large", f"value is over {MAX_ANNOUNCED_VALUE_BYTES} bytes; DHT entries must stay small")
    stored = await request.app[STATE_KEY].node.announce(request.match_info["key"], value)
    return web.json_response({"stored_on": stored})


async def delete_dht(request: web.Request) -> web.Response:
    await request.app[STATE_KEY].node.withdraw(request.match_info["key"])
    return web.json_response({"withdrawn": True})


def add_node_routes(app: web.Application) -> None:
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/dht/{key}", get_dht)
    app.router.add_put("/v1/dht/{key}", put_dht)
    app.router.add_delete("/v1/dht/{key}", delete_dht)
