"""Real petald processes on 127.0.0.1 forming a swarm over libp2p + the signed Kademlia DHT (issue: swarm node)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from petal.ctl.client import Client, DaemonError
from tests.support.daemons import Swarm

TTL = 6.0  # short expiry so the test can watch entries vanish


@pytest.fixture
def swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    (root / "fast.toml").write_text(f"announce_ttl = {TTL}\n")
    yield s
    s.close()
    shutil.rmtree(root, ignore_errors=True)


def entries(daemon, key, state=None):
    """Entries under `key` as read by `daemon` from the network; withdrawn ones come back marked "offline"."""
    got = daemon.client.get(f"/v1/dht/{key}")["entries"]
    return {e["peer_id"]: e["value"] for e in got if state is None or e["state"] == state}


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_five_daemons_share_signed_entries_that_expire(swarm):
    cfg = str(swarm.root / "fast.toml")
    boot = swarm.start_bootstrap("d0", "--config", cfg)
    others = [swarm.join(f"d{i}", boot, "--config", cfg) for i in range(1, 5)]
    daemons = [boot, *others]
    announcers, readers = daemons[1:4], [daemons[0], daemons[4]]
    key = "tiny-llama.7"
    for i, d in enumerate(announcers):
        d.client.request("PUT", f"/v1/dht/{key}", {"value": {"span": [i * 10, i * 10 + 10], "state": "online"}})
    ids = {d.status()["peer_id"]: i for i, d in enumerate(announcers)}
    assert len(ids) == 3
    assert all(d.status()["reachable"] is True for d in others)  # the bootstrap peer dialled each one back
    for d in daemons:  # every daemon, announcer or not, reads all three from the network
        got = entries(d, key)
        assert set(got) == set(ids), f"{d.name} saw {sorted(got)}"
        for peer, i in ids.items():
            assert got[peer]["span"] == [i * 10, i * 10 + 10]

    # A SIGKILLed daemon cannot withdraw or re-announce: its entry expires while the others are kept alive.
    victim = announcers[0]
    victim_id = victim.status()["peer_id"]
    victim.kill()
    wait_for(lambda: victim_id not in entries(readers[0], key), 4 * TTL, "the killed daemon's entry to expire")
    time.sleep(TTL)  # past another full TTL, the live daemons' re-announced entries are still there
    for r in readers:
        assert set(entries(r, key)) == set(ids) - {victim_id}

    # A clean withdrawal marks the entry offline at once (so routers learn the server left); others stay online.
    announcers[1].client.request("DELETE", f"/v1/dht/{key}")
    withdrawn = announcers[1].status()["peer_id"]
    assert set(entries(readers[1], key, "offline")) == {withdrawn}
    assert set(entries(readers[1], key)) - set(entries(readers[1], key, "offline")) == {
        announcers[2].status()["peer_id"]
    }


def test_restart_keeps_peer_id_and_sigterm_is_clean(swarm):
    d = swarm.start_bootstrap("solo")
    first = d.status()["peer_id"]
    assert d.status()["reachable"] is None  # nobody to ask in a swarm of one
    assert d.stop() == 0
    assert not d.socket.exists(), "the control socket is removed on shutdown"
    assert "stopped" in d.log()
    again = swarm.make("solo", "--new-swarm").start()  # same state dir
    assert again.status()["peer_id"] == first
    assert (d.state_dir / "identity.key").stat().st_mode & 0o777 == 0o600


def test_garbage_datagrams_and_frames_do_not_stop_the_daemon(swarm):
    boot = swarm.start_bootstrap("g0")
    peer = swarm.join("g1", boot)
    port = boot.status()["dht_port"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for payload in (b"", b"\x00" * 7, os.urandom(1200), b"\x92\x01\x02", os.urandom(60000)):
            s.sendto(payload, ("127.0.0.1", port))
    # garbage on a raw TCP connection to the libp2p port (not even a valid handshake)
    host, tcp_port = "127.0.0.1", int(boot.address.split("/")[4])
    with socket.create_connection((host, tcp_port), timeout=5) as c:
        c.sendall(os.urandom(4096))
    peer.client.request("PUT", "/v1/dht/k.0", {"value": {"x": 1}})
    assert list(entries(boot, "k.0")) == [peer.status()["peer_id"]]
    assert boot.proc.poll() is None


def test_config_errors_are_clear(tmp_path):
    def run(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "petal.daemon", *a], capture_output=True, text=True, timeout=60)

    r = run("--state-dir", str(tmp_path), "--socket", str(tmp_path / "s"))
    assert r.returncode == 2 and "--initial-peer" in r.stderr and "--new-swarm" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("listne = 3\n")
    r = run("--config", str(bad))
    assert r.returncode == 2 and "unknown setting 'listne'" in r.stderr


def test_client_says_how_to_start_a_daemon(tmp_path):
    with pytest.raises(DaemonError) as e:
        Client(tmp_path / "nothing.sock").status()
    assert e.value.code == "unavailable" and "petald --new-swarm" in e.value.message


async def test_live_daemon_refuses_forged_replayed_and_foreign_entries(swarm):
    """Hostile store RPCs aimed at a running petald cannot change, replace or remove another server's entry."""
    import asyncio
    import dataclasses

    from petal.daemon.dht.network import DHT
    from petal.daemon.identity import Identity
    from petal.protocol.records import key_digest, sign_entry

    cfg = str(swarm.root / "fast.toml")
    boot = swarm.start_bootstrap("h0", "--config", cfg)
    honest = swarm.join("h1", boot, "--config", cfg)
    key = "tiny-llama.3"
    honest.client.request("PUT", f"/v1/dht/{key}", {"value": {"t": 10.0}})
    honest_id = honest.status()["peer_id"]
    mallory = DHT(Identity.generate())
    await mallory.start([("127.0.0.1", boot.status()["dht_port"])])
    try:
        (old,) = [e for e in await mallory.get(key) if e.peer_id == honest_id]
        await asyncio.sleep(TTL / 3 + 1)  # honest re-announces: a newer entry supersedes `old`
        target = ("127.0.0.1", boot.status()["dht_port"])

        async def store(record: bytes) -> int:
            ok, accepted = await mallory.protocol._call(target, "store", mallory.node_id, key_digest(key), [record])
            assert ok
            return accepted

        forged = dataclasses.replace(
            old, value={"t": 1e9}, issued_at=time.time()
        ).to_record()  # signature no longer matches
        unsigned = bytes(64) + forged[64:]
        assert await store(forged) == 0 and await store(unsigned) == 0
        assert await store(old.to_record()) == 0  # replayed old entry
        # Mallory's own entry is accepted beside the honest one, never in its place
        now = time.time()
        assert (
            await store(sign_entry(mallory.identity, key, {"t": 1e9}, issued_at=now, expires_at=now + 30).to_record())
            == 1
        )
        got = entries(boot, key)
        assert got[honest_id] == {"t": 10.0} and got[mallory.identity.peer_id] == {"t": 1e9}
        assert boot.proc.poll() is None
    finally:
        await mallory.stop()
