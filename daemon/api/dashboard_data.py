"""``GET /v1/dashboard``: everything the dashboard page (``dashboard.py``) draws, in one JSON answer.

Per model: every server announced under its block keys (``swarm_map``: offline and draining ones too), with the
round trip this daemon measured to it (the router probes servers it has not timed lately; one that does not answer
is banned and shows as "unreachable"), each block's state, whether the model is fully covered, and the chain a
session would take now. Plus this daemon's own status. One of the lazily loaded endpoints: the router needs torch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

from aiohttp import web

from petal.daemon.api.state import STATE_KEY, ApiState
from petal.daemon.api.swarm_map import (
    MAX_MAP_BLOCKS,
    SwarmModel,
    block_states,
    reach,
    scan_servers,
    short_id,
    swarm_models,
    uncovered_ranges,
)
from petal.daemon.routing.spotcheck import read_reports
from petal.daemon.routing.swarm import ServerInfo
from petal.protocol.errors import PetalError

MAX_MODELS: Final = 16
"""Models one answer describes (the first by name); a swarm serving more is shown in part."""
ROUTE_TIMEOUT: Final = 10.0
"""Seconds the route (and its probes) may take before the answer goes out without it."""


async def model_json(state: ApiState, model: SwarmModel) -> dict[str, Any]:
    router = state.router
    try:  # the router's view checks the records against this daemon's copy of the model, when it has one; fresh,
        # so the route below never goes through a server this very answer shows offline
        view = await router.view(model.name, fresh=True)
        num_blocks, fingerprint, family = view.num_blocks, view.fingerprint, view.family
    except PetalError:  # no server record confirms the model's shape: draw what the model records claim
        num_blocks, fingerprint, family = None, None, ""
    num_blocks = min(num_blocks or model.num_blocks, MAX_MAP_BLOCKS)
    fingerprint = fingerprint or model.fingerprint
    servers = await scan_servers(state.node.dht, model.name, num_blocks, fingerprint)
    live = [ServerInfo.from_record(s.record) for s in servers if s.record.state in ("online", "joining")]
    route: list[dict[str, Any]] | None = None
    route_error: str | None = None
    try:
        await asyncio.wait_for(router.probe_all(model.name, live), ROUTE_TIMEOUT)
        chain = await asyncio.wait_for(router.inference_chain(model.name), ROUTE_TIMEOUT)
    except PetalError as e:
        route_error = e.message
    except TimeoutError:
        route_error = f"no route found within {ROUTE_TIMEOUT:.0f} s"
    else:
        route = [
            {
                "peer_id": h.peer_id,
                "short_id": short_id(h.peer_id),
                "public_name": h.server.public_name,
                "start": h.start,
                "end": h.end,
                "rtt_s": router.latency.get(h.peer_id),
            }
            for h in chain
        ]
    try:  # signed mismatch reports (issue 15): how many distinct clients caught each server returning wrong outputs
        reports = await read_reports(state.node.dht, model.name, [s.peer_id for s in servers])
    except (OSError, TimeoutError, RuntimeError):
        reports = {}
    rows = []
    # our live libp2p connections: a server that announced only a circuit may be "upgraded" to direct (DCUtR)
    links: dict[str, dict[str, str]] = getattr(state.node.transport, "peer_links", dict)()
    for s in servers:
        row = s.to_json(router.is_banned)
        row["reach"] = reach(s.relayed, links.get(s.peer_id))
        row["reports"] = len({r.signer for r in reports.get(s.peer_id, [])})
        row["rtt_s"] = None if row["state"] == "offline" else router.latency.get(s.peer_id)  # not a stale one
        bandwidth = router.bandwidth(s.peer_id)
        row["link_mbit"] = None if bandwidth is None else round(bandwidth / 1e6, 1)
        rows.append(row)
    blocks = block_states(servers, num_blocks, router.is_banned)
    uncovered = uncovered_ranges(blocks)
    return {
        "model": model.name,
        "fingerprint": fingerprint,
        "family": family or model.family,
        "num_blocks": num_blocks,
        "servers": rows,
        "blocks": blocks,
        "healthy": not uncovered,
        "uncovered": uncovered,
        "route": route,
        "route_error": route_error,
    }


async def get_dashboard(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    wanted = request.query.get("model")
    models = await swarm_models(state.node.dht)
    if wanted:
        models = [m for m in models if m.name == wanted]
    out = [await model_json(state, m) for m in models[:MAX_MODELS]]
    return web.json_response(
        {
            "daemon": state.node.status(),
            "models": out,
            "more_models": max(0, len(models) - MAX_MODELS),
            "at": time.time(),
        }
    )


def add_dashboard_data_routes(app: web.Application) -> None:
    app.router.add_get("/v1/dashboard", get_dashboard)
