"""The ``auto`` wire codec: lossless (``none``) per hop unless the link to that server was measured slow, then ``q8``.

The rule is tested with injected bandwidths (no timing assertions): the pure rule, the router's choice per server
(request codec, daemon codec, loopback servers, best of recent samples), and sessions and forward calls through real
BlockServers in one process, where the threshold makes every link slow or fast whatever the probe measured.
"""

from __future__ import annotations

from typing import cast

import pytest
import torch

from petal.daemon.api.generate import codec_option
from petal.daemon.api.tensors import route_options
from petal.daemon.config import CODEC_CHOICES as CONFIG_CODECS
from petal.daemon.config import Config, ConfigError
from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.routing.calls import forward
from petal.daemon.routing.router import FIRST_BANDWIDTH_SAMPLES, Router, auto_codec, on_this_host
from petal.daemon.routing.session import InferenceSession
from petal.daemon.routing.swarm import ServerInfo
from petal.protocol.errors import PetalError
from petal.protocol.messages import CODEC_CHOICES
from tests.support.swarms import MODEL, N, embed, logits

REMOTE = ("/ip4/192.0.2.7/tcp/31330/p2p/12D3KooWRemote",)
LOCAL = ("/ip4/127.0.0.1/tcp/31330/p2p/12D3KooWLocal", "/ip6/::1/tcp/31330")
MBIT = 1e6


def router(codec: str = "auto", slow_link_mbit: float = 100.0) -> Router:
    return Router(cast(Transport, None), cast(SwarmDHT, None), codec=codec, slow_link_mbit=slow_link_mbit)


def test_rule_slow_link_gets_q8_fast_or_unmeasured_gets_none():
    assert auto_codec(None) == "none"  # not measured: lossless until proven slow
    assert auto_codec(20 * MBIT) == "q8"
    assert auto_codec(99.9 * MBIT) == "q8"
    assert auto_codec(100 * MBIT) == "none"
    assert auto_codec(10_000 * MBIT) == "none"
    assert auto_codec(300 * MBIT, slow_link_mbit=1000) == "q8"
    assert auto_codec(3 * MBIT, slow_link_mbit=1) == "none"


def test_loopback_servers_are_on_this_host():
    assert on_this_host(LOCAL)
    assert on_this_host(["/ip4/127.0.0.2/tcp/1"])
    assert not on_this_host(REMOTE)
    assert not on_this_host([*LOCAL, *REMOTE])  # one address elsewhere: the link may be that one
    assert not on_this_host([])
    assert not on_this_host(["/dns4/localhost/tcp/1", "/ip4/not-an-ip/tcp/1", "garbage"])


def test_router_picks_per_server_from_injected_bandwidth():
    r = router()
    slow, fast, unknown = (ServerInfo(p, 0, 10, addrs=REMOTE) for p in ("slow", "fast", "unknown"))
    r.record_bandwidth("slow", 20 * MBIT)
    r.record_bandwidth("fast", 900 * MBIT)
    assert (r.codec_for(slow), r.codec_for(fast), r.codec_for(unknown)) == ("q8", "none", "none")
    # a request's codec wins; "auto" in a request follows the rule too
    assert r.codec_for(slow, "none") == "none"
    assert r.codec_for(fast, "q8") == "q8"
    assert r.codec_for(fast, "float16") == "float16"
    assert r.codec_for(slow, "auto") == "q8"
    # the estimate is the best recent sample: a slow sample among fast ones is noise, not a slow link
    r.record_bandwidth("fast", 5 * MBIT)
    assert r.bandwidth("fast") == 900 * MBIT and r.codec_for(fast) == "none"
    # a server on this host is never a slow link, whatever was measured
    r.record_bandwidth("local", 1 * MBIT)
    assert r.codec_for(ServerInfo("local", 0, 10, addrs=LOCAL)) == "none"
    # the threshold is the daemon's setting
    r.slow_link_mbit = 10
    assert r.codec_for(slow) == "none"


def test_fixed_daemon_codec_is_used_as_is():
    r = router(codec="q8")
    server = ServerInfo("fast", 0, 10, addrs=REMOTE)
    r.record_bandwidth("fast", 900 * MBIT)
    assert r.codec_for(server) == "q8"
    assert r.codec_for(server, "auto") == "none"  # a request may still ask for auto
    assert router(codec="none").codec_for(ServerInfo("slow", 0, 1, addrs=REMOTE)) == "none"
    with pytest.raises(ValueError, match="codec 'zip'"):
        router(codec="zip")


def test_daemon_option_defaults_to_auto_and_is_checked():
    assert CONFIG_CODECS == CODEC_CHOICES
    assert Config(new_swarm=True).validate().codec == "auto"
    for codec in CODEC_CHOICES:
        assert Config(new_swarm=True, codec=codec).validate().codec == codec
    with pytest.raises(ConfigError, match="codec 'q4'"):
        Config(new_swarm=True, codec="q4").validate()  # checked on a client daemon too, not only a server
    with pytest.raises(ConfigError, match="slow_link_mbit"):
        Config(new_swarm=True, slow_link_mbit=0).validate()


async def test_probe_measures_the_link(swarm):
    await swarm.add(0, N)
    assert swarm.router.codec == "auto"  # the default
    view = await swarm.router.view(MODEL)
    (server,) = view.servers.values()
    assert swarm.router.bandwidth(server.peer_id) is None
    assert await swarm.router.probe(MODEL, server) is not None
    bandwidth = swarm.router.bandwidth(server.peer_id)
    assert bandwidth is not None and bandwidth > 0  # its value is the machine's business, not the test's
    assert len(swarm.router._bandwidth[server.peer_id]) == FIRST_BANDWIDTH_SAMPLES
    await swarm.router.probe(MODEL, server)  # latency again, but the link was measured moments ago
    assert len(swarm.router._bandwidth[server.peer_id]) == FIRST_BANDWIDTH_SAMPLES


@pytest.mark.parametrize("slow", [True, False])
async def test_session_and_forward_follow_the_rule(swarm, model, slow):
    for a, b in [(0, 2), (2, 4), (4, 6)]:
        await swarm.add(a, b)
    # whatever the in-memory links measure, a threshold far above (below) every measure makes them slow (fast)
    swarm.router.slow_link_mbit = 1e15 if slow else 1e-15
    want_codec = "q8" if slow else "none"
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        async with InferenceSession(swarm.router, MODEL, max_length=8) as s:  # no codec: the daemon's, auto
            got = logits(model, await s.step(embed(model, ids)))
            assert [link.remote.span.codec for link in s._links] == [want_codec] * 3
        out = logits(model, await forward(swarm.router, MODEL, embed(model, ids)))
    for result in (got, out):
        if slow:
            assert ((result - want).norm() / want.norm()).item() < 0.05  # q8's tolerance (test_session.py)
            assert not torch.equal(result, want)
        else:
            torch.testing.assert_close(result, want, atol=1e-4, rtol=0)


def test_request_option_is_checked_on_every_endpoint():
    """``codec`` in /v1/generate, completions and chat (codec_option) and forward/backward/sessions
    (route_options): every choice the daemon takes, null for the daemon's own, anything else a 400 naming it."""
    for read in (lambda b: codec_option(b), lambda b: route_options(b)["codec"]):
        assert read({}) is None and read({"codec": None}) is None
        for codec in CODEC_CHOICES:
            assert read({"codec": codec}) == codec
        for bad in ("zip", "", "Q8", 8, ["none"]):
            with pytest.raises(PetalError) as e:
                read({"codec": bad})
            assert e.value.code == "bad_request" and "'codec'" in str(e.value)
