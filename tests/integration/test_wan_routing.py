"""Routes that know the links, on emulated WAN links (tests/support/netns.py; root only, skipped elsewhere).

Server A (blocks 0:15) pushes to the next span's servers B1 and B2 (15:30). The A-B1 link is slow (100 ms round
trip), A-B2 fast; the client itself is a little closer to B1 than to B2, so a route from the client's own pings alone
takes the slow pushed link. A measures its round trips to B1 and B2 and announces them (``next_pings``), and the
client's route goes A -> B2.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from petal.ctl.client import DaemonError
from tests.support.netns import lab_or_skip
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def models_dir():
    root = Path(tempfile.mkdtemp(prefix="petal-wm-", dir="/tmp"))
    tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64).save_pretrained(
        root / MODEL, safe_serialization=True
    )
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab():
    with lab_or_skip("petal-w-") as lab:
        yield lab


def test_route_avoids_the_slow_pushed_link(lab, models_dir):
    for host in ("a", "b1", "b2", "c"):
        lab.add_host(host)
    lab.link("a", "b1", rtt_ms=100)
    lab.link("c", "b2", rtt_ms=20)
    env = {"PETAL_MODELS_DIR": str(models_dir)}
    a = lab.daemon("a", "a", "--new-swarm", "--serve", MODEL, "--blocks", "0:15").start(extra_env=env)
    boot = ("--initial-peer", a.address)
    specs = [("b1", ("--serve", MODEL, "--blocks", "15:30")), ("b2", ("--serve", MODEL, "--blocks", "15:30")),
             ("c", ())]  # fmt: skip
    with ThreadPoolExecutor(max_workers=3) as pool:
        b1, b2, client = pool.map(lambda s: lab.daemon(s[0], s[0], *boot, *s[1]).start(extra_env=env), specs)
    ids = {d.status()["peer_id"]: d.name for d in (a, b1, b2)}

    def route() -> list[str]:
        try:
            chain = client.client.get(f"/v1/route?model={MODEL}")["chain"]
        except DaemonError:
            return []
        return [ids[h["peer_id"]] for h in chain]

    deadline = time.monotonic() + 120
    while route() != ["a", "b2"] and time.monotonic() < deadline:
        time.sleep(1.0)
    assert route() == ["a", "b2"], f"route {route()}; a's log:\n{a.log()[-3000:]}"
    assert "round trips to the servers of block 15" in a.log()  # what moved the route: A's announced next pings
