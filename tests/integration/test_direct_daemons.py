"""The direct data plane with real petald processes: block traffic over TLS/TCP gives the libp2p path's results.

Three daemons serve a tiny random 30-block Llama ([0, 10), [10, 20), [20, 30)) with the default settings (the
direct plane on). Two client daemons serve nothing: one with the defaults (its block streams go over the direct
plane) and one with `--direct off` (libp2p only, the baseline of the same run). Forward and an inference session
through each must agree with each other and with the same weights run locally. The relay-only fallback is covered
in tests/unit/daemon/test_direct.py.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from petal.ctl.client import Client
from petal.kernels.span import Span
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
HIDDEN = 32
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    m = tiny_llama(num_hidden_layers=30, hidden_size=HIDDEN, intermediate_size=64)
    m.save_pretrained(root / MODEL, safe_serialization=True)
    yield root, m
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def swarm(model):
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(model[0])}
    try:
        boot = s.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:10").start(extra_env=env)
        servers = [boot]
        for name, blocks in (("s1", "10:20"), ("s2", "20:30")):
            args = ("--initial-peer", boot.address, "--serve", MODEL, "--blocks", blocks)
            servers.append(s.make(name, *args).start(extra_env=env))
        direct = s.make("cd", "--initial-peer", boot.address).start(extra_env=env)
        plain = s.make("cl", "--initial-peer", boot.address, "--direct", "off").start(extra_env=env)
        yield servers, direct, plain
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


def reference(model, hidden: torch.Tensor, start: int = 0, end: int = 30) -> torch.Tensor:
    with torch.no_grad():
        return Span.from_model(model, start, end)(hidden)


def session_outputs(client: Client, hidden: torch.Tensor) -> torch.Tensor:
    with client.open_session(MODEL, max_length=hidden.shape[1], codec="none") as s:
        outs = [s.step(hidden[:, :5])]
        for t in range(5, hidden.shape[1]):
            outs.append(s.step(hidden[:, t : t + 1]))
    return torch.cat(outs, dim=1)


def test_forward_and_session_over_the_direct_plane_equal_the_libp2p_path(swarm, model):
    servers, direct, plain = swarm
    via_direct, via_libp2p = Client(direct.socket, timeout=120), Client(plain.socket, timeout=120)
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    want = reference(model[1], hidden)
    out_direct = via_direct.forward(MODEL, hidden, codec="none")
    out_libp2p = via_libp2p.forward(MODEL, hidden, codec="none")
    torch.testing.assert_close(out_direct, out_libp2p, atol=1e-6, rtol=0)
    torch.testing.assert_close(out_direct, want, atol=ATOL, rtol=0)

    steps = torch.randn(1, 9, HIDDEN)
    s_direct, s_libp2p = session_outputs(via_direct, steps), session_outputs(via_libp2p, steps)
    torch.testing.assert_close(s_direct, s_libp2p, atol=1e-6, rtol=0)
    torch.testing.assert_close(s_direct, reference(model[1], steps), atol=ATOL, rtol=0)

    # the direct client's block streams went over the direct plane, the plain client's did not
    direct_id, plain_id = direct.status()["peer_id"], plain.status()["peer_id"]
    assert f"direct connection to peer {servers[0].status()['peer_id']}" in direct.log()
    for server in servers:
        assert f"direct connection from peer {direct_id}" in server.log()
        assert f"direct connection from peer {plain_id}" not in server.log()
    assert "direct connection" not in plain.log()
