"""``GET /metrics``: the daemon and the swarm in the Prometheus text format (version 0.0.4), written here (no client
library at run time; tests parse it with ``prometheus_client``'s parser).

Counting costs the hot path plain integer increments on the asyncio loop (no locks): ``ApiMetrics.middleware`` times
every control-API request into a histogram per route and counts error answers by code; wire bytes are counted where
frames are encoded and decoded (``petal.protocol.frames.WIRE``), inference steps where the server's compute queue
takes them (``Jobs.submitted``). A scrape reads the rest: this daemon's status and hosted spans, and the swarm's
servers and blocks per state from the DHT (``swarm_map``, torch-free, so a client-only daemon stays without torch).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web

from petal.daemon.api.errors import Handler, code_of_status
from petal.daemon.api.state import STATE_KEY, ApiState
from petal.daemon.api.swarm_map import STATES, MapServer, SwarmModel, block_states, scan_servers, swarm_models
from petal.protocol.frames import WIRE

log = logging.getLogger("petal.control")

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
"""Upper bounds (seconds) of the request latency histogram: a status read takes about a millisecond, a generation
or an open session stream minutes."""
MAX_ROUTES: Final = 64
"""Distinct (method, route) series kept; routes are aiohttp's templates (``/v1/sessions/{id}/step``), so this only
bounds what unknown methods could add."""


class Histogram:
    """Cumulative-on-export histogram: one bucket counter per bound, bumped with a bisect and an increment."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds


class ApiMetrics:
    """What this daemon's control API counts between scrapes."""

    def __init__(self) -> None:
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.errors: dict[str, int] = {}
        self.started = time.time()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: time the request and, for an error answer, count its code (read from the JSON error body)."""
        t0 = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as e:  # a redirect raised past errors_as_json (it answers every error itself)
            if e.status >= 400:
                self._count(code_of_status(e.status))
            raise
        finally:  # a client that hung up (CancelledError) is timed, and counts as no error
            self._observe(request, time.perf_counter() - t0)
        if response.status >= 400:
            self._count(_error_code(response))
        return response

    def _observe(self, request: web.Request, seconds: float) -> None:
        route = _route_of(request)
        key = (request.method if request.method in _METHODS else "OTHER", route)
        hist = self.latency.get(key)
        if hist is None:
            if len(self.latency) >= MAX_ROUTES:
                key = ("OTHER", "other")
                hist = self.latency.setdefault(key, Histogram())
            else:
                hist = self.latency[key] = Histogram()
        hist.observe(seconds)

    def _count(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _route_of(request: web.Request) -> str:
    """The route's template, never the raw path (ids and model names would make a series each)."""
    try:
        resource = request.match_info.route.resource
    except AttributeError:
        return "unmatched"
    if resource is None:
        return "unmatched"
    canonical = resource.canonical
    return "unmatched" if canonical.startswith("/{tail") else canonical


def _error_code(response: web.StreamResponse) -> str:
    body = getattr(response, "body", None)
    if isinstance(body, bytes) and len(body) < 65536:
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            pass
        else:
            if isinstance(code, str) and code.isidentifier() and len(code) <= 40:
                return code
    return "http_" + str(response.status)


METRICS_KEY: Final = web.AppKey("metrics", ApiMetrics)


# --- the text format ------------------------------------------------------------------------------------------


class Exposition:
    """Builds the text: ``family`` once per metric name (HELP and TYPE), then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")

    def histogram(self, name: str, hist: Histogram, **labels: object) -> None:
        running = 0
        for bound, n in zip((*LATENCY_BUCKETS, math.inf), hist.counts, strict=True):
            running += n
            self.sample(f"{name}_bucket", running, **labels, le=_number(bound))
        self.sample(f"{name}_sum", hist.total, **labels)
        self.sample(f"{name}_count", hist.count, **labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def render_api(out: Exposition, metrics: ApiMetrics) -> None:
    """The counters the middleware keeps and the wire bytes."""
    out.family("petal_api_request_duration_seconds", "histogram", "Control API requests by method and route.")
    for (method, route), hist in sorted(metrics.latency.items()):
        out.histogram("petal_api_request_duration_seconds", hist, method=method, route=route)
    out.family("petal_api_errors_total", "counter", "Control API answers that were errors, by error code.")
    for code, n in sorted(metrics.errors.items()):
        out.sample("petal_api_errors_total", n, code=code)
    out.family("petal_wire_sent_bytes_total", "counter", "Bytes of frames sent to other daemons (block streams).")
    out.sample("petal_wire_sent_bytes_total", WIRE.sent)
    out.family("petal_wire_received_bytes_total", "counter", "Bytes of frames received from other daemons.")
    out.sample("petal_wire_received_bytes_total", WIRE.received)


def render_node(out: Exposition, status: dict[str, Any]) -> None:
    """This daemon: uptime, DHT peers and every span it hosts."""
    out.family("petal_uptime_seconds", "gauge", "Seconds since this daemon started.")
    out.sample("petal_uptime_seconds", float(status.get("uptime_s", 0.0)))
    out.family("petal_dht_peers", "gauge", "Nodes in this daemon's DHT routing table.")
    out.sample("petal_dht_peers", int(status.get("dht_peers", 0)))
    serving: list[dict[str, Any]] = status.get("serving") or []
    hosted = (
        ("petal_hosted_throughput_tokens_per_second", "gauge", "throughput", "Measured throughput of a hosted span."),
        ("petal_hosted_cache_tokens_left", "gauge", "cache_tokens_left", "Tokens a new session could still cache."),
        ("petal_hosted_sessions_open", "gauge", "sessions", "Inference sessions open on a hosted span."),
        ("petal_hosted_inference_steps_total", "counter", "inference_steps", "Inference steps a hosted span took."),
        ("petal_hosted_training_calls_total", "counter", "training_calls", "Forward/backward calls a span took."),
        ("petal_hosted_step_batches_total", "counter", "step_batches", "Batches of >1 inference step a span ran."),
        (
            "petal_hosted_step_batched_total",
            "counter",
            "step_batched_jobs",
            "Inference steps run inside those batches.",
        ),
        ("petal_hosted_step_largest_batch", "gauge", "step_largest_batch", "Most inference steps in one batch."),
        ("petal_hosted_training_batches_total", "counter", "training_batches", "Batches of >1 forward/backward call."),
        ("petal_hosted_training_batched_total", "counter", "training_batched_jobs", "Calls run inside those batches."),
        ("petal_hosted_inline_steps_total", "counter", "inline_steps", "Inference steps run on the event loop."),
    )
    for name, kind, field, help_text in hosted:
        out.family(name, kind, help_text)
        for s in serving:
            if isinstance(s.get(field), int | float):
                out.sample(name, s[field], model=s["model"], span=f"{s['start']}:{s['end']}")


async def render_swarm(out: Exposition, state: ApiState) -> None:
    """The swarm per model as announced in the DHT: servers and blocks per state, each server's throughput and cache."""
    dht = state.node.dht
    models = await swarm_models(dht)
    per_model = [(m, await scan_servers(dht, m.name, m.num_blocks, m.fingerprint)) for m in models]
    out.family("petal_swarm_servers", "gauge", "Servers of a model by state, as announced in the DHT.")
    for m, servers in per_model:
        counts = dict.fromkeys(STATES, 0)
        for server in servers:
            counts[server.state()] += 1
        for s in STATES:
            out.sample("petal_swarm_servers", counts[s], model=m.name, state=s)
    out.family("petal_swarm_blocks", "gauge", "Blocks of a model by the best state of the servers covering them.")
    for m, servers in per_model:
        blocks = block_states(servers, m.num_blocks)
        for s in STATES:
            out.sample("petal_swarm_blocks", blocks.count(s), model=m.name, state=s)
    _server_gauges(out, per_model)


def _server_gauges(out: Exposition, per_model: Iterable[tuple[SwarmModel, list[MapServer]]]) -> None:
    rows = [(m, s) for m, servers in per_model for s in servers if s.record.state != "offline"]
    gauges = (
        ("petal_swarm_server_throughput_tokens_per_second", "throughput", "A server span's announced throughput."),
        ("petal_swarm_server_cache_tokens_left", "cache_tokens_left", "Tokens a new session could cache there."),
    )
    for name, field, help_text in gauges:
        out.family(name, "gauge", help_text)
        for m, s in rows:
            span = f"{s.record.start}:{s.record.end}"
            out.sample(name, getattr(s.record, field), model=m.name, peer_id=s.peer_id, span=span)


async def get_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    out = Exposition()
    render_api(out, request.app[METRICS_KEY])
    render_node(out, state.node.status())
    try:
        await render_swarm(out, state)
    except Exception as e:  # noqa: BLE001 - the daemon's own metrics are worth a scrape without the swarm's
        log.warning("/metrics: cannot read the swarm from the DHT: %s", e)
        out.family("petal_swarm_scrape_errors", "gauge", "1 when this scrape could not read the swarm from the DHT.")
        out.sample("petal_swarm_scrape_errors", 1)
    return web.Response(body=out.text().encode(), headers={"Content-Type": CONTENT_TYPE})


def add_metrics_routes(app: web.Application, metrics: ApiMetrics) -> None:
    """``/metrics``; ``metrics.middleware`` must be the app's outermost middleware to see every answer."""
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", get_metrics)
