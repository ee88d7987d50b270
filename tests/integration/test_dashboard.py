"""The swarm dashboard (``GET /``) and ``/metrics`` against real daemons (issue #13).

Three servers host a tiny random 6-block Llama ([0,3) named "alpha lab", [3,6) named "beta", [0,6)); a fourth
daemon hosts nothing and serves the API over TCP too. Headless Chromium logs in with the token URL, opens the page
and must show every server and the block map; after one server is stopped (SIGTERM: it withdraws its records) a
fresh look must show it offline. Screenshots are saved under the test's tmp dir (and copied to $PETAL_SCREENSHOT_DIR
when set). ``/metrics`` is parsed with prometheus_client's parser.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from petal.ctl.cli import cli
from petal.ctl.client import Client
from tests.support.browser import CHROMIUM, SKIP_REASON, run_chromium
from tests.support.daemons import Daemon, Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-dash"
BLOCKS = 6
SPANS = {"s0": ("0:3", "alpha lab"), "s1": ("3:6", "beta"), "s2": ("0:6", None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-db-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    m = tiny_llama(num_hidden_layers=BLOCKS, hidden_size=32, intermediate_size=64)
    m.save_pretrained(root / "models" / MODEL, safe_serialization=True)
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(root / "models"), "OMP_NUM_THREADS": "1"}
    servers: dict[str, Daemon] = {}
    try:
        for name, (blocks, public) in SPANS.items():
            join = ["--new-swarm"] if not servers else ["--initial-peer", servers["s0"].address]
            named = ["--public-name", public] if public else []
            servers[name] = s.make(name, *join, "--serve", MODEL, "--blocks", blocks, *named).start(extra_env=env)
        for attempt in range(3):  # a free port can be taken by an outgoing connection before petald binds it
            port = free_port()
            client = s.make(f"c{attempt}", "--initial-peer", servers["s0"].address, "--http", f"127.0.0.1:{port}")
            try:
                client.start(extra_env=env)
                break
            except RuntimeError as e:
                if "is in use" not in str(e) or attempt == 2:
                    raise
        wait_for_route(client, MODEL, BLOCKS)
        yield servers, client, port
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def peer(d: Daemon) -> str:
    return d.status()["peer_id"]


def dashboard_states(client: Daemon) -> dict[str, str]:
    (model,) = client.client.get(f"/v1/dashboard?model={MODEL}")["models"]
    return {s["peer_id"]: s["state"] for s in model["servers"]}


def wait_for_states(client: Daemon, want: dict[str, str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := dashboard_states(client)) != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"/v1/dashboard shows {got}, not {want}:\n{client.log()[-2000:]}")
        time.sleep(0.5)


def over_socket(d: Daemon) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://localhost", timeout=60)


def page_rows(dom: str, role: str) -> dict[str, str]:
    """peer id -> state of each row in the page's table with data-role=ROLE (the block map or the server list)."""
    table = re.search(rf'<table[^>]*data-role="{role}"[^>]*>(.*?)</table>', dom, re.S)
    assert table, f"no {role} table in the page:\n{dom[-3000:]}"
    rows = re.findall(r'<tr data-peer="([^"]+)" data-state="([^"]+)"', table.group(1))
    return dict(rows)


def look(profile: Path, url: str, shot: Path) -> str:
    """The page's DOM after its script ran, and a screenshot of it."""
    out = run_chromium(profile, url, "--dump-dom")
    assert 'data-loaded="true"' in out.stdout, (
        f"the page never drew its data:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    )
    run_chromium(profile, url, f"--screenshot={shot}", "--window-size=1400,900", "--hide-scrollbars")
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot"
    target = os.environ.get("PETAL_SCREENSHOT_DIR")
    if target:
        shutil.copy(shot, Path(target) / shot.name)
    return out.stdout


def test_the_page_shows_every_server_and_the_block_map_and_a_stopped_server_goes_offline(swarm, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(SKIP_REASON)
    servers, client, port = swarm
    ids = {name: peer(d) for name, d in servers.items()}
    wait_for_states(client, dict.fromkeys(ids.values(), "online"))
    login = client.client.get("/v1/http/token")["url"]
    profile = tmp_path / "chromium"

    dom = look(profile, login, tmp_path / "dashboard-online.png")  # the login URL redirects to the page
    assert page_rows(dom, "block-map") == dict.fromkeys(ids.values(), "online")
    assert page_rows(dom, "servers") == dict.fromkeys(ids.values(), "online")
    cells = re.findall(r'data-block="(\d+)" data-state="(\w+)"', dom)
    assert cells == [(str(i), "online") for i in range(BLOCKS)]
    assert f'data-model="{MODEL}" data-healthy="true"' in dom
    assert "alpha lab" in dom and "beta" in dom
    route = re.search(r'data-role="route">(.*?)</div>', dom, re.S)
    assert route and route.group(1).count('class="hop"') >= 1, dom[-2000:]

    servers["s1"].stop()  # SIGTERM: it drains and withdraws its records, which then read "offline"
    wait_for_states(client, {ids["s0"]: "online", ids["s1"]: "offline", ids["s2"]: "online"})
    dom = look(profile, f"http://127.0.0.1:{port}/", tmp_path / "dashboard-stopped.png")
    assert page_rows(dom, "block-map") == {ids["s0"]: "online", ids["s1"]: "offline", ids["s2"]: "online"}
    assert page_rows(dom, "servers")[ids["s1"]] == "offline"
    cells = re.findall(r'data-block="(\d+)" data-state="(\w+)"', dom)
    assert cells == [(str(i), "online") for i in range(BLOCKS)]  # [0,6) still covers blocks 3..5


def test_without_the_token_the_page_is_refused_over_tcp_and_the_socket_serves_it(swarm, tmp_path):
    _, client, port = swarm
    if CHROMIUM.exists():  # a browser that never opened the login URL
        fresh = run_chromium(tmp_path / "chromium", f"http://127.0.0.1:{port}/", "--dump-dom")
        assert "petal-dashboard" not in fresh.stdout and "unauthorized" in fresh.stdout
    with over_socket(client) as http:  # the socket needs no token
        page = http.get("/")
        assert page.status_code == 200 and 'id="petal-dashboard"' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        js = http.get("/static/dashboard.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        missing = http.get("/static/index.py")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        data = http.get("/v1/dashboard").json()
    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())
    jsonschema.validate(data, {"$ref": "#/components/schemas/Dashboard", "components": spec["components"]})
    assert [m["model"] for m in data["models"]] == [MODEL]


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(found: dict[str, list], name: str, **labels: str) -> float:
    matching = [s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, f"{name}{labels}: {matching}"
    return matching[0]


def test_metrics_parse_and_agree_with_the_swarm(swarm):
    servers, client, _ = swarm
    with Client(client.socket).open_session(MODEL, 16) as session:  # an inference step through every server
        session.step(torch.randn(1, 4, 32))
    with over_socket(client) as http:
        assert http.get("/v1/nosuch").status_code == 404  # one not_found answer
        reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(reply.text)

    states = dashboard_states(client)
    for state in ("online", "offline"):
        want = sum(1 for s in states.values() if s == state)
        assert value(found, "petal_swarm_servers", model=MODEL, state=state) == want
    assert value(found, "petal_swarm_blocks", model=MODEL, state="online") == BLOCKS
    assert value(found, "petal_api_errors_total", code="not_found") >= 1
    step = value(found, "petal_api_request_duration_seconds_count", method="POST", route="/v1/sessions/{sid}/step")
    assert step >= 1
    assert value(found, "petal_wire_sent_bytes_total") > 0 and value(found, "petal_wire_received_bytes_total") > 0
    assert "petal_hosted_sessions_open" not in found  # the client hosts nothing

    steps = 0.0
    for name in ("s0", "s2"):  # s1 may have been stopped by the test above
        with over_socket(servers[name]) as http:
            on_server = samples(http.get("/metrics").text)
        span = SPANS[name][0]
        steps += value(on_server, "petal_hosted_inference_steps_total", model=MODEL, span=span)
        assert value(on_server, "petal_hosted_cache_tokens_left", model=MODEL, span=span) > 0
        assert value(on_server, "petal_hosted_throughput_tokens_per_second", model=MODEL, span=span) > 0
        assert value(on_server, "petal_hosted_sessions_open", model=MODEL, span=span) == 0
    assert steps >= 1  # the session's step ran on one of them


def test_petalctl_swarm_and_route_print_the_same_facts(swarm):
    _, client, _ = swarm
    runner = CliRunner()
    r = runner.invoke(cli, ["--socket", str(client.socket), "swarm", "-m", MODEL])
    assert r.exit_code == 0, r.output
    for peer_id, state in dashboard_states(client).items():  # a row per server, s1's too once stopped
        line = next(row for row in r.output.splitlines() if peer_id[-8:] in row)
        assert state in line and "float32/none" in line and "direct" in line
    assert "alpha lab" in r.output and "healthy" in r.output and "route: " in r.output
    r = runner.invoke(cli, ["--socket", str(client.socket), "route", "-m", MODEL])
    assert r.exit_code == 0 and "RTT ms" in r.output and "0:6" in r.output, r.output
    assert "direct (TLS)" in r.output, r.output  # loopback servers announce their own addresses and a TLS port
    hops = client.client.request("GET", f"/v1/route?model={MODEL}")["chain"]
    assert hops and all(h["reach"] == "direct" and h["tls"] is True for h in hops), hops


def test_a_client_only_daemon_serves_the_page_and_metrics_without_loading_torch(swarm):
    servers, _, _ = swarm
    bare = Swarm(Path(tempfile.mkdtemp(prefix="petal-db-bare-", dir="/tmp")))
    try:
        d = bare.make("bare", "--initial-peer", servers["s0"].address).start()
        with over_socket(d) as http:
            assert 'id="petal-dashboard"' in http.get("/").text
            found = samples(http.get("/metrics").text)
        assert value(found, "petal_swarm_blocks", model=MODEL, state="online") == BLOCKS
        assert d.proc is not None and "libtorch" not in Path(f"/proc/{d.proc.pid}/maps").read_text()
    finally:
        bare.close()
        shutil.rmtree(bare.root, ignore_errors=True)
