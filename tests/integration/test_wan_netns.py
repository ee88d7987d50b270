"""The network-namespace harness itself (tests/support/netns.py): shaped links delay what they should, a natted host
dials out but cannot be dialed, and closing removes every namespace. Root only; skipped with the reason elsewhere."""

from __future__ import annotations

import pytest

from tests.support.netns import Lab, NetnsUnavailable, leftover_namespaces

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def lab(tmp_path):
    try:
        lab = Lab(tmp_path)
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    yield lab
    lab.close()


def test_link_delay_shows_in_ping_and_only_on_that_link(lab):
    for name in ("a", "b", "c"):
        lab.add_host(name)
    lab.link("a", "b", rtt_ms=80)
    slow, fast = lab.ping_ms("a", "b"), lab.ping_ms("a", "c")
    assert 80 <= slow < 80 + 40, slow  # netem never delivers early; the slack is for a loaded machine
    assert fast < 20, fast
    lab.link("a", "b", rtt_ms=20)  # reshaping a link replaces its settings
    assert 20 <= lab.ping_ms("a", "b") < 60


def test_natted_host_dials_out_but_is_not_reachable(lab):
    lab.add_host("pub")
    lab.add_natted_host("priv")
    pub, priv = lab.hosts["pub"], lab.hosts["priv"]
    assert priv.sh("ping", "-n", "-c", "1", "-W", "2", pub.ip, check=False).returncode == 0
    r = pub.sh("ping", "-n", "-c", "1", "-W", "2", priv.ip, check=False)
    assert r.returncode != 0


def test_close_removes_every_namespace(tmp_path):
    try:
        lab = Lab(tmp_path)
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    lab.add_host("a")
    lab.add_natted_host("b")
    assert len(leftover_namespaces(lab)) == 4  # bridge, a, the NAT router, b
    lab.close()
    assert leftover_namespaces(lab) == []
    lab.close()  # twice is harmless
