"""Control API endpoints about models and the swarm: /v1/models, /v1/models/pull, /v1/swarm and /v1/route.

They read what servers announce in the DHT (through the router's cached views) and the local models dir; none of
them runs a block.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from petal.daemon.api.bodies import ndjson_line, read_json
from petal.daemon.api.errors import stream_error
from petal.daemon.api.frontend import resolve_model
from petal.daemon.api.state import STATE_KEY, ApiState
from petal.daemon.api.swarm_map import reach, relay_only
from petal.daemon.pull import PullError, pull_model
from petal.daemon.routing.chains import uncovered
from petal.daemon.routing.swarm import ServerInfo, announced_models
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY
from petal.protocol.socket_api import NDJSON, error_body


async def swarm_models(state: ApiState) -> list[dict[str, Any]]:
    """Every model announced under the models key, merged over servers (fingerprint = the majority's)."""
    entries = await state.node.dht.get(MODELS_KEY)
    seen: dict[str, dict[str, Any]] = {}
    for record in announced_models(e.value for e in entries):
        m = seen.setdefault(
            record.name,
            {
                "id": record.name,
                "object": "model",
                "created": 0,
                "owned_by": "petal",
                "family": record.family,
                "num_blocks": record.num_blocks,
                "fingerprints": {},
            },
        )
        fp = record.fingerprint
        m["fingerprints"][fp] = m["fingerprints"].get(fp, 0) + 1
    out = []
    for m in seen.values():
        fps = m.pop("fingerprints")
        m["fingerprint"] = max(fps.items(), key=lambda kv: (kv[1], kv[0]))[0]
        m["servers"] = sum(fps.values())
        out.append(m)
    return sorted(out, key=lambda m: m["id"])


def _server_json(s: ServerInfo, latency: float | None) -> dict[str, Any]:
    return {
        "peer_id": s.peer_id,
        "start": s.start,
        "end": s.end,
        "state": s.state,
        "throughput": s.throughput,
        "cache_tokens_left": s.cache_tokens_left,
        "quant": s.quant,
        "dtype": s.dtype,
        "version": s.version,
        "public_name": s.public_name,
        "adapters": list(s.adapters),
        "addrs": list(s.addrs),
        "latency_s": latency,
    }


async def get_models(request: web.Request) -> web.Response:
    """Models announced in the swarm; those also in the local store carry their ``path`` (clients load parts there)."""
    models = await swarm_models(request.app[STATE_KEY])
    for m in models:
        with contextlib.suppress(PetalError):
            m["path"] = str(resolve_model(m["id"]))
    return web.json_response({"object": "list", "data": models})


async def get_swarm(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model = request.query.get("model")
    names = [model] if model else [m["id"] for m in await swarm_models(state)]
    out = []
    for name in names:
        view = await state.router.view(name, fresh=True)
        servers = sorted(view.servers.values(), key=lambda s: (s.start, s.end, s.peer_id))
        online = [s for s in servers if s.state == "online"]
        out.append(
            {
                "model": name,
                "fingerprint": view.fingerprint,
                "num_blocks": view.num_blocks,
                "family": view.family,
                "servers": [_server_json(s, state.router.latency.get(s.peer_id)) for s in servers],
                "uncovered": [list(r) for r in uncovered(online, 0, view.num_blocks or 0)],
            }
        )
    return web.json_response({"models": out})


async def get_route(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model = request.query.get("model")
    if not model:
        raise PetalError("bad_request", "pass ?model=NAME")
    await state.router.view(model, fresh=True)  # a diagnostic: route on what servers announce now, not a cached view
    chain = await state.router.inference_chain(model)
    links: dict[str, dict[str, str]] = getattr(state.node.transport, "peer_links", dict)()
    hops = [
        {
            "peer_id": h.peer_id,
            "start": h.start,
            "end": h.end,
            "server_span": [h.server.start, h.server.end],
            "latency_s": state.router.latency.get(h.peer_id),
            "throughput": h.server.throughput,
            "public_name": h.server.public_name,
            "reach": reach(relay_only(h.server.addrs + h.server.direct), links.get(h.peer_id)),
            "tls": bool(h.server.direct),
        }
        for h in chain
    ]
    return web.json_response({"model": model, "chain": hops})


async def post_pull(request: web.Request) -> web.StreamResponse:
    """Pull a model into the local models dir: ``{name, path}``, or with ``stream`` NDJSON stage lines first."""
    body = await read_json(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise PetalError("bad_request", 'body must be {"name": "smollm2"}')
    if not body.get("stream"):
        try:
            path = await asyncio.to_thread(pull_model, name, None, False)
        except PullError as e:
            raise PetalError("bad_request", str(e)) from None
        return web.json_response({"name": name, "path": str(path)})
    # streamed: one {"event": "stage"} line as each stage starts, then {"event": "done"} (or an {"error"} line)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def pull() -> None:
        try:
            path = pull_model(name, None, False, lambda text: emit({"event": "stage", "name": name, "text": text}))
            emit({"event": "done", "name": name, "path": str(path)})
        except PullError as e:
            emit(error_body("bad_request", str(e)))
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            emit(stream_error(e))
        finally:
            emit({})  # end of stream

    work = asyncio.ensure_future(asyncio.to_thread(pull))  # a client that hangs up does not stop a pull halfway
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    while event := await events.get():
        await response.write(ndjson_line(event))
    await work
    await response.write_eof()
    return response


def add_model_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", get_models)
    app.router.add_post("/v1/models/pull", post_pull)
    app.router.add_get("/v1/swarm", get_swarm)
    app.router.add_get("/v1/route", get_route)
