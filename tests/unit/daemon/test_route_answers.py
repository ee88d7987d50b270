"""``GET /v1/route`` and the dashboard's route answer on what servers announce now, not on a cached swarm view.

The router serves sessions from a view up to ``max_age`` old (a DHT read per call would cost every request); the
diagnostics read fresh, so a server that just withdrew is never shown as the route while the same answer, or the one
before, shows it offline (a flaky ``petalctl route`` in CI, stop 22).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from petal.daemon.api.dashboard_data import model_json
from petal.daemon.api.models import get_route
from petal.daemon.api.state import STATE_KEY
from petal.daemon.api.swarm_map import SwarmModel
from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.identity import Identity
from petal.daemon.routing.router import Router
from petal.protocol.records import MODELS_KEY, ModelRecord, ServerRecord, block_key

MODEL = "m"
BLOCKS = 2


async def test_route_and_dashboard_leave_out_a_server_that_withdrew_since_the_view_was_read():
    swarm = MemorySwarm()
    fast, slow, reader = (MemoryDHT(Identity.generate(), swarm) for _ in range(3))
    for node in (fast, slow, reader):
        await node.start()
    record = ServerRecord(("/ip4/127.0.0.1/tcp/1",), 0, BLOCKS, "online", 50.0, 1024, "float32", 1, fingerprint="FP")
    for node in (fast, slow):
        await node.announce(MODELS_KEY, ModelRecord(MODEL, "FP", BLOCKS, "llama").to_value(), ttl=60)
        for block in range(BLOCKS):
            await node.announce(block_key(MODEL, block), record.to_value(), ttl=60)
    fast_id, slow_id = fast.identity.peer_id, slow.identity.peer_id
    router = Router(None, reader, max_age=60.0)  # type: ignore[arg-type]  # no probes: latencies are set below
    router.record_latency(fast_id, 0.001)
    router.record_latency(slow_id, 0.050)
    state = SimpleNamespace(router=router, node=SimpleNamespace(dht=reader, transport=None))
    request = SimpleNamespace(query={"model": MODEL}, app={STATE_KEY: state})
    try:
        assert [h.peer_id for h in await router.inference_chain(MODEL)] == [fast_id]  # the view is read and kept
        for block in range(BLOCKS):
            await fast.withdraw(block_key(MODEL, block))  # it stops (SIGTERM): its records now read "offline"
        assert [h.peer_id for h in await router.inference_chain(MODEL)] == [fast_id], "sessions use the young view"

        answer = json.loads((await get_route(request)).text)  # type: ignore[arg-type]
        assert [h["peer_id"] for h in answer["chain"]] == [slow_id]

        for block in range(BLOCKS):  # back online: the dashboard must see it without waiting for max_age either
            await fast.announce(block_key(MODEL, block), record.to_value(), ttl=60)
        await router.view(MODEL, fresh=True)
        assert [h.peer_id for h in await router.inference_chain(MODEL)] == [fast_id]
        for block in range(BLOCKS):
            await fast.withdraw(block_key(MODEL, block))
        drawn = await model_json(state, SwarmModel(MODEL, "FP", BLOCKS, "llama", 2))  # type: ignore[arg-type]
        states = {row["peer_id"]: row["state"] for row in drawn["servers"]}
        assert states == {fast_id: "offline", slow_id: "online"}
        assert [h["peer_id"] for h in drawn["route"]] == [slow_id]
    finally:
        await router.close()
        for node in (fast, slow, reader):
            await node.stop()
