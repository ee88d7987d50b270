"""A server behind a real NAT (tests/support/netns.py: its own namespace behind a masquerading router; root only,
skipped elsewhere): it learns it cannot be dialed, serves through a circuit relay, and when that relay dies it
reserves on another reachable peer and announces the new circuit, and clients reach it again. Clients that came
in through the relay are upgraded to direct connections by DCUtR: a public one (the natted server dials it, which its
NAT lets out) and one behind a NAT of its own (a true hole punch), and the public one falls back to the relay when the
NAT drops its direct connection.

Nothing here is emulated in the daemons: the NAT drops every connection attempt from outside, so the natted server's
own addresses (libp2p and direct plane) are unreachable and only the circuit works (CompositeTransport falls back).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from petal.ctl.client import DaemonError
from petal.kernels.span import Span
from tests.support.netns import lab_or_skip
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
HIDDEN = 32
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def model():
    root = Path(tempfile.mkdtemp(prefix="petal-nm-", dir="/tmp"))
    m = tiny_llama(num_hidden_layers=30, hidden_size=HIDDEN, intermediate_size=64)
    m.save_pretrained(root / MODEL, safe_serialization=True)
    yield root, m
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab():
    with lab_or_skip("petal-n-") as lab:
        yield lab


def circuits(daemon) -> list[str]:
    return [a for a in daemon.status()["addrs"] if "/p2p-circuit" in a]


def forward_when_routed(client, hidden: torch.Tensor, timeout: float = 90.0) -> torch.Tensor:
    """The swarm's output for ``hidden``, retried while the client's view still has the old circuit address."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.client.forward(MODEL, hidden, codec="none")
        except DaemonError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def wait_for_links(a, a_peer: str, b, b_peer: str, timeout: float = 90.0) -> tuple[dict, dict]:
    """How ``a`` is connected to ``b`` and ``b`` to ``a`` (status "links"), once both connections are "upgraded" from
    relayed to direct, or whatever they are at ``timeout`` (a CI run on 2 busy cores once took 26 s between the two
    upgrades of this test: 30 s was too tight)."""
    deadline = time.monotonic() + timeout
    while True:
        links = a.status()["links"].get(a_peer, {}), b.status()["links"].get(b_peer, {})
        if all(link.get("reach") == "upgraded" for link in links) or time.monotonic() > deadline:
            return links
        time.sleep(0.5)


def test_natted_server_serves_through_a_relay_that_is_replaced_when_it_dies(lab, model):
    models_dir, m = model
    for host in ("r1", "r2", "s0", "c"):
        lab.add_host(host)
    lab.add_natted_host("nat")
    lab.add_host_behind_own_nat("far")  # a client behind a NAT of its own: only a true hole punch gets it direct
    env = {"PETAL_MODELS_DIR": str(models_dir)}
    r1 = lab.daemon("r1", "r1", "--new-swarm").start(extra_env=env)
    specs = [("r2", ()), ("s0", ("--serve", MODEL, "--blocks", "0:15"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        r2, _s0 = pool.map(lambda s: lab.daemon(s[0], s[0], "--initial-peer", r1.address, *s[1]).start(env), specs)
    nat = lab.daemon("nat", "nat", "--initial-peer", r1.address, "--initial-peer", r2.address,
                     "--serve", MODEL, "--blocks", "15:30").start(extra_env=env)  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        client, far = pool.map(lambda h: lab.daemon(h, h, "--initial-peer", r2.address).start(env), ("c", "far"))
    r1_id, r2_id = r1.status()["peer_id"], r2.status()["peer_id"]

    status = nat.status()
    assert status["reachable"] is False and far.status()["reachable"] is False, status
    assert [c for c in circuits(nat) if f"/p2p/{r1_id}/p2p-circuit" in c], status["addrs"]

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        want = Span.from_model(m, 0, 30)(hidden)
    torch.testing.assert_close(forward_when_routed(client, hidden), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(forward_when_routed(far, hidden), want, atol=1e-4, rtol=0)
    # DCUtR: both clients came in through the relay. The public client is dialed back by the natted server (its NAT
    # lets that out); the client behind its own NAT and the server dial each other at once from their listen ports
    # (TCP simultaneous open through both NATs: a true hole punch). The relayed connections are closed once the
    # direct ones are up, and both ends of each report it "upgraded", over the routers' public addresses.
    client_id, far_id, nat_id = (d.status()["peer_id"] for d in (client, far, nat))
    for peer, peer_id, public_ip in ((client, client_id, lab.hosts["c"].ip), (far, far_id, lab.hosts["_nat_far"].ip)):
        links = wait_for_links(peer, nat_id, nat, peer_id)
        reach = [link.get("reach") for link in links]
        assert reach == ["upgraded", "upgraded"], f"{links}\n{nat.log()[-2000:]}\n{peer.log()[-2000:]}"
        assert links[0]["addr"].startswith(f"/ip4/{lab.hosts['_nat'].ip}/tcp/"), links  # not a circuit
        assert links[1]["addr"].startswith(f"/ip4/{public_ip}/tcp/"), links
        torch.testing.assert_close(peer.client.forward(MODEL, hidden, codec="none"), want, atol=1e-4, rtol=0)
        assert peer.status()["links"][nat_id]["reach"] == "upgraded"  # the forward went over the direct connection
        hops = peer.client.request("GET", f"/v1/route?model={MODEL}")["chain"]
        assert [h["reach"] for h in hops if h["peer_id"] == nat_id] == ["upgraded"], hops  # `petalctl route` too
    steps = torch.randn(1, 6, HIDDEN)  # an inference session, s0 pushing to the natted server (relayed or upgraded)
    with client.client.open_session(MODEL, max_length=6, codec="none") as session:
        out = torch.cat([session.step(steps[:, :3]), session.step(steps[:, 3:4]), session.step(steps[:, 4:])], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(out, Span.from_model(m, 0, 30)(steps), atol=1e-4, rtol=0)

    r1.kill()  # the relay dies: the natted server must find another one
    lab.cut("nat", "c")  # and the NAT drops its mapping to the client: the client must come back through the new relay
    deadline = time.monotonic() + 90
    while not [c for c in circuits(nat) if f"/p2p/{r2_id}/p2p-circuit" in c] and time.monotonic() < deadline:
        time.sleep(1.0)
    addrs = nat.status()["addrs"]
    assert [c for c in addrs if f"/p2p/{r2_id}/p2p-circuit" in c], f"{addrs}\n{nat.log()[-3000:]}"
    assert not [c for c in addrs if f"/p2p/{r1_id}/" in c], addrs  # the dead circuit is no longer announced
    torch.testing.assert_close(forward_when_routed(client, hidden), want, atol=1e-4, rtol=0)
    link = client.status()["links"].get(nat_id, {})
    assert link.get("reach") == "relayed" and f"/p2p/{r2_id}/p2p-circuit" in link.get("addr", ""), link
