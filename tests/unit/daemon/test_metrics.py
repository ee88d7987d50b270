"""``/metrics``: the Prometheus text petald writes (checked with prometheus_client's parser), the swarm map it
reads from the DHT, and the middleware's counting of latencies and error codes."""

from __future__ import annotations

from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from petal.daemon.api.errors import errors_as_json
from petal.daemon.api.metrics import LATENCY_BUCKETS, ApiMetrics, Exposition, Histogram, render_api, render_swarm
from petal.daemon.api.swarm_map import block_states, scan_servers, swarm_models, uncovered_ranges
from petal.daemon.dht.memory import MemoryDHT, MemorySwarm
from petal.daemon.identity import Identity
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY, ModelRecord, ServerRecord, block_key

MODEL = "m"
BLOCKS = 4


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_and_label_escaping_survive_the_parser():
    hist = Histogram()
    for seconds in (0.0005, 0.003, 0.003, 7.0, 1e6):
        hist.observe(seconds)
    out = Exposition()
    out.family("x_seconds", "histogram", "help with a \\ backslash\nand a newline")
    out.histogram("x_seconds", hist, route='/a"b\\c\nd')
    got = parse(out.text())
    label = (("le", "0.001"), ("route", '/a"b\\c\nd'))
    assert got[("x_seconds_bucket", label)] == 1
    assert got[("x_seconds_bucket", (("le", "0.005"), ("route", '/a"b\\c\nd')))] == 3
    assert got[("x_seconds_bucket", (("le", "+Inf"), ("route", '/a"b\\c\nd')))] == 5
    assert got[("x_seconds_count", (("route", '/a"b\\c\nd'),))] == 5
    assert abs(got[("x_seconds_sum", (("route", '/a"b\\c\nd'),))] - (0.0065 + 7.0 + 1e6)) < 1e-6
    buckets = [v for (name, _), v in got.items() if name == "x_seconds_bucket"]
    assert buckets == sorted(buckets) and len(buckets) == len(LATENCY_BUCKETS) + 1  # cumulative


async def test_the_middleware_times_routes_by_template_and_counts_error_codes():
    metrics = ApiMetrics()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"]})

    async def busy(request: web.Request) -> web.Response:
        raise PetalError("busy", "try later")

    app = web.Application(middlewares=[metrics.middleware, errors_as_json])
    app.router.add_get("/v1/things/{id}", ok)
    app.router.add_post("/v1/busy", busy)
    async with TestClient(TestServer(app)) as client:
        for i in range(3):
            assert (await client.get(f"/v1/things/{i}")).status == 200
        assert (await client.post("/v1/busy")).status == 503
        assert (await client.get("/nowhere")).status == 404
    out = Exposition()
    render_api(out, metrics)
    got = parse(out.text())
    count = "petal_api_request_duration_seconds_count"
    assert got[(count, (("method", "GET"), ("route", "/v1/things/{id}")))] == 3  # one series, not one per id
    assert got[(count, (("method", "POST"), ("route", "/v1/busy")))] == 1
    assert got[("petal_api_errors_total", (("code", "busy"),))] == 1
    assert got[("petal_api_errors_total", (("code", "not_found"),))] == 1
    assert ("petal_wire_sent_bytes_total", ()) in got


def server(start: int, end: int, state: str = "online", name: str = "") -> dict:
    return ServerRecord(
        ("/ip4/127.0.0.1/tcp/1",), start, end, state, 50.0, 1024, "float32", 1, public_name=name
    ).to_value()


async def test_the_swarm_map_counts_servers_and_blocks_per_state():
    swarm = MemorySwarm()
    nodes = [MemoryDHT(Identity.generate(), swarm) for _ in range(4)]
    for node in nodes:
        await node.start()
    spans = [(0, 2, "online", "a"), (2, 4, "offline", "b"), (1, 3, "joining", ""), (0, 4, "draining", "")]
    for node, (start, end, state, name) in zip(nodes, spans, strict=True):
        await node.announce(MODELS_KEY, ModelRecord(MODEL, "FP", BLOCKS, "llama").to_value(), ttl=60)
        for block in range(start, end):
            await node.announce(block_key(MODEL, block), server(start, end, state, name), ttl=60)
    reader = nodes[0]
    (model,) = await swarm_models(reader)
    assert (model.name, model.num_blocks, model.servers) == (MODEL, BLOCKS, 4)
    servers = await scan_servers(reader, MODEL, BLOCKS, "FP")
    assert sorted(s.state() for s in servers) == ["draining", "joining", "offline", "online"]
    assert {s.record.public_name for s in servers} == {"a", "b", ""}
    blocks = block_states(servers, BLOCKS)
    assert blocks == ["online", "online", "joining", "draining"]
    assert uncovered_ranges(blocks) == [[3, 4]]  # draining takes no new sessions
    unreachable = servers[0].peer_id  # the [0, 2) server, once this daemon's probe of it failed
    assert block_states(servers, BLOCKS, lambda p: p == unreachable)[0] == "draining"

    out = Exposition()
    await render_swarm(out, SimpleNamespace(node=SimpleNamespace(dht=reader)))
    got = parse(out.text())
    for state, n in {"online": 1, "joining": 1, "draining": 1, "offline": 1, "unreachable": 0}.items():
        assert got[("petal_swarm_servers", (("model", MODEL), ("state", state)))] == n
    assert got[("petal_swarm_blocks", (("model", MODEL), ("state", "online")))] == 2
    throughput = [k for k in got if k[0] == "petal_swarm_server_throughput_tokens_per_second"]
    assert len(throughput) == 3  # offline servers are not listed with a throughput
