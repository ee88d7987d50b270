"""Control API endpoints about this node itself: /v1/status, and /v1/dht/{key} to read, announce or withdraw raw
DHT entries (low-level; the block servers announce their own records).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.state import STATE_KEY
from petal.protocol.errors import PetalError
from petal.protocol.records import MAX_RECORD_BYTES, OFFLINE, STATE_FIELD, RecordError, check_announcement

MAX_ANNOUNCED_VALUE_BYTES: Final = MAX_RECORD_BYTES
"""Largest entry (signature, key and value, msgpack) PUT /v1/dht/{key} announces: what one DHT record may hold."""


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
    """Low-level: announce this node's own signed entry under a key and keep it alive (until DELETE or stop).

    The value is checked exactly as the DHT will sign it, and its withdrawal (the same value marked offline) too,
    before anything is kept: a value that cannot be signed is a 400 (413 if too large) and is never re-announced.
    """
    body = await read_json(request)
    value = body.get("value")
    if not isinstance(value, dict):
        raise PetalError("bad_request", 'body must be {"value": {...}}')
    key = request.match_info["key"]
    try:
        check_announcement(key, value)
        check_announcement(key, {**value, STATE_FIELD: OFFLINE})
    except RecordError as e:
        raise PetalError("too_large" if e.code == "too_large" else "bad_request", e.message) from None
    stored = await request.app[STATE_KEY].node.announce(key, value)
    return web.json_response({"stored_on": stored})


async def delete_dht(request: web.Request) -> web.Response:
    await request.app[STATE_KEY].node.withdraw(request.match_info["key"])
    return web.json_response({"withdrawn": True})


def add_node_routes(app: web.Application) -> None:
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/dht/{key}", get_dht)
    app.router.add_put("/v1/dht/{key}", put_dht)
    app.router.add_delete("/v1/dht/{key}", delete_dht)
