"""Issue #16 findings 7 and 14 over real daemons: a request the client got wrong, or one forged DHT record, must not
take a healthy server out of everyone's routes.

One server serves a tiny 4-block Llama with a small KV budget; ``c`` is a client daemon with the model in its local
models dir; ``evil`` is a daemon with no local copy that also writes forged ``_models`` records (signed with its own
identity through ``PUT /v1/dht/_models``, as any peer can). After every bad request or forged record, a normal
generation and a forward still work, and ``/v1/route`` still routes through the server (a banned server would not be
routed through: the route would answer 503).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from petal.ctl.client import Client, DaemonError
from tests.support.daemons import Daemon, Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-faults"
BLOCKS = 4
HIDDEN = 64


@pytest.fixture(scope="module")
def swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-f-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    models, empty = root / "models", root / "empty"
    empty.mkdir()
    tiny_llama(num_hidden_layers=BLOCKS, hidden_size=HIDDEN, intermediate_size=64).save_pretrained(
        models / MODEL, safe_serialization=True
    )
    s = Swarm(root)
    try:
        server = s.make(
            "s0", "--new-swarm", "--serve", MODEL, "--blocks", f"0:{BLOCKS}", "--max-cache-tokens", "4096"
        ).start(extra_env={"PETAL_MODELS_DIR": str(models)})
        client = s.make("c", "--initial-peer", server.address).start(extra_env={"PETAL_MODELS_DIR": str(models)})
        evil = s.make("evil", "--initial-peer", server.address).start(extra_env={"PETAL_MODELS_DIR": str(empty)})
        wait_for_route(client, MODEL, BLOCKS)
        wait_for_route(evil, MODEL, BLOCKS)
        yield server, client, evil
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def assert_still_served(server: Daemon, daemon: Daemon) -> None:
    """Another client of ``daemon`` still generates and forwards, through ``server``, which is not banned."""
    other = Client(daemon.socket, timeout=120)
    peer = server.status()["peer_id"]
    [view] = other.get(f"/v1/swarm?model={MODEL}")["models"]  # a fresh read of the DHT
    assert view["num_blocks"] == BLOCKS and [s["peer_id"] for s in view["servers"]] == [peer]
    chain = other.get(f"/v1/route?model={MODEL}")["chain"]
    assert [(h["peer_id"], h["start"], h["end"]) for h in chain] == [(peer, 0, BLOCKS)]
    assert other.forward(MODEL, torch.randn(1, 3, HIDDEN)).shape == (1, 3, HIDDEN)
    if daemon.name == "c":  # generation needs the model's client parts: only c has them
        done = list(other.generate(MODEL, input_ids=[1, 2, 3], max_new_tokens=3))[-1]
        assert done["done"] and len(done["tokens"]) == 3
    assert "banning server" not in daemon.log()


def test_a_session_larger_than_the_servers_whole_budget_is_the_callers_error(swarm):
    server, client, _ = swarm
    with pytest.raises(DaemonError) as e:
        Client(client.socket, timeout=120).request(
            "POST", "/v1/sessions", {"model": MODEL, "max_length": 4096, "batch": 2}
        )
    assert e.value.status == 413 and e.value.code == "too_large", e.value
    assert "max_length" in e.value.message or "batch" in e.value.message
    assert_still_served(server, client)


def test_a_request_over_the_frame_limit_is_refused_before_it_is_sent(swarm):
    server, client, _ = swarm
    c = Client(client.socket, timeout=120)
    with pytest.raises(DaemonError) as e:  # 300000 x 64 float32 with codec none: 77 MB, over the 64 MiB frame
        c.forward(MODEL, torch.zeros(1, 300_000, HIDDEN), codec="none")
    assert e.value.status == 413 and e.value.code == "too_large", e.value
    assert "split" in e.value.message
    assert_still_served(server, client)
    half = torch.zeros(1, 150_000, HIDDEN)  # hidden and grad: each fits, the backward request does not (77 MB)
    with pytest.raises(DaemonError) as e:
        c.backward(MODEL, half, half, codec="none")
    assert e.value.status == 413 and e.value.code == "too_large", e.value
    assert_still_served(server, client)


@pytest.mark.parametrize("blocks", [BLOCKS + 1, 30_000])
def test_a_forged_models_record_changes_no_ones_view_of_the_model(swarm, blocks):
    """One signed record with an inflated block count: clients with and without a local copy keep the real shape."""
    server, client, evil = swarm
    [view] = client.client.get(f"/v1/swarm?model={MODEL}")["models"]
    forged = {"n": MODEL, "f": view["fingerprint"], "b": blocks, "fm": "llama", "st": "online"}
    evil.client.request("PUT", "/v1/dht/_models", {"value": forged})
    try:
        entries = client.client.get("/v1/dht/_models")["entries"]
        assert any(e["value"].get("b") == blocks for e in entries), "the forged record must be readable"
        for daemon in (client, evil):  # evil has no local copy: the records that agree with the servers decide
            assert_still_served(server, daemon)
    finally:
        evil.client.request("DELETE", "/v1/dht/_models")
