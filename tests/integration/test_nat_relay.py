"""A server behind a real NAT (tests/support/netns.py: its own namespace behind a masquerading router; root only,
skipped elsewhere): it learns it cannot be dialed, serves through a circuit relay, and when that relay dies it
reserves on another reachable peer and announces the new circuit, and clients reach it again.

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


def test_natted_server_serves_through_a_relay_that_is_replaced_when_it_dies(lab, model):
    models_dir, m = model
    for host in ("r1", "r2", "s0", "c"):
        lab.add_host(host)
    lab.add_natted_host("nat")
    env = {"PETAL_MODELS_DIR": str(models_dir)}
    r1 = lab.daemon("r1", "r1", "--new-swarm").start(extra_env=env)
    specs = [("r2", ()), ("s0", ("--serve", MODEL, "--blocks", "0:15"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        r2, _s0 = pool.map(lambda s: lab.daemon(s[0], s[0], "--initial-peer", r1.address, *s[1]).start(env), specs)
    nat = lab.daemon("nat", "nat", "--initial-peer", r1.address, "--initial-peer", r2.address,
                     "--serve", MODEL, "--blocks", "15:30").start(extra_env=env)  # fmt: skip
    client = lab.daemon("c", "c", "--initial-peer", r2.address).start(extra_env=env)
    r1_id, r2_id = r1.status()["peer_id"], r2.status()["peer_id"]

    status = nat.status()
    assert status["reachable"] is False, status
    assert [c for c in circuits(nat) if f"/p2p/{r1_id}/p2p-circuit" in c], status["addrs"]

    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    with torch.no_grad():
        want = Span.from_model(m, 0, 30)(hidden)
    torch.testing.assert_close(forward_when_routed(client, hidden), want, atol=1e-4, rtol=0)
    steps = torch.randn(1, 6, HIDDEN)  # an inference session, s0 pushing to the natted server through the relay
    with client.client.open_session(MODEL, max_length=6, codec="none") as session:
        out = torch.cat([session.step(steps[:, :3]), session.step(steps[:, 3:4]), session.step(steps[:, 4:])], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(out, Span.from_model(m, 0, 30)(steps), atol=1e-4, rtol=0)

    r1.kill()  # the relay dies: the natted server must find another one
    deadline = time.monotonic() + 90
    while not [c for c in circuits(nat) if f"/p2p/{r2_id}/p2p-circuit" in c] and time.monotonic() < deadline:
        time.sleep(1.0)
    addrs = nat.status()["addrs"]
    assert [c for c in addrs if f"/p2p/{r2_id}/p2p-circuit" in c], f"{addrs}\n{nat.log()[-3000:]}"
    assert not [c for c in addrs if f"/p2p/{r1_id}/" in c], addrs  # the dead circuit is no longer announced
    torch.testing.assert_close(forward_when_routed(client, hidden), want, atol=1e-4, rtol=0)
