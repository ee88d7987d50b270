"""Control API endpoints about trust: ``POST /v1/verify`` (check every server of a model now, ``petalctl verify``) and
``GET /v1/trust`` (this daemon's spot-check counters, the servers it has banned, and the signed mismatch reports the
swarm holds about each server). The checks themselves live in ``petal.daemon.routing.spotcheck``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.models import swarm_models
from petal.daemon.api.state import STATE_KEY
from petal.daemon.routing.spotcheck import VERIFY_TOKENS, read_reports, verify_swarm
from petal.protocol.errors import PetalError

MAX_VERIFY_TOKENS = 256


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PetalError("bad_request", f"{name} must be a whole number from {lo} to {hi}, got {value!r:.40}")
    return value


async def post_verify(request: web.Request) -> web.Response:
    """``{model, tokens?, seed?, report?}``: the same probe to every server of every span; a verdict per server."""
    body = await read_json(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise PetalError("bad_request", 'body must be {"model": "NAME"} (see GET /v1/models for the names)')
    tokens = _int(body, "tokens", VERIFY_TOKENS, 1, MAX_VERIFY_TOKENS)
    seed = _int(body, "seed", 0, 0, 2**31 - 1)
    report = body.get("report", False)
    if not isinstance(report, bool):
        raise PetalError("bad_request", "report must be true or false")
    router = request.app[STATE_KEY].router
    view = await router.view(model, fresh=True)
    result = await verify_swarm(router.spot, view, tokens=tokens, seed=seed, report=report)
    return web.json_response(result)


async def get_trust(request: web.Request) -> web.Response:
    """Spot-check counters, banned servers and mismatch reports (``?model=NAME``; every announced model without)."""
    state = request.app[STATE_KEY]
    router = state.router
    model = request.query.get("model")
    names = [model] if model else [m["id"] for m in await swarm_models(state)]
    models = []
    for name in names:
        view = await router.view(name)
        peers = sorted(view.servers)
        found = await read_reports(state.node.dht, name, peers)
        models.append(
            {
                "model": name,
                "banned": [p for p in peers if router.is_banned(p)],
                "reports": [
                    {
                        "peer_id": peer,
                        "signers": len({r.signer for r in seen}),
                        "reports": [r.to_json() for r in seen],
                    }
                    for peer, seen in sorted(found.items())
                ],
            }
        )
    return web.json_response({"spot_checks": router.spot.stats(), "models": models})


def add_verify_routes(app: web.Application) -> None:
    app.router.add_post("/v1/verify", post_verify)
    app.router.add_get("/v1/trust", get_trust)
