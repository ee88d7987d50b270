"""systemd's notify protocol, seen by a real NOTIFY_SOCKET the test binds (tests/support/daemons.py): READY=1, the
STATUS= lines that follow start-up and serving, WATCHDOG=1 pings when WATCHDOG_USEC asks for them, STOPPING=1."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemons import Daemon, Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama

MODEL = "tiny"
BLOCKS = 6  # tiny_llama's layers
WATCHDOG = {"WATCHDOG_USEC": "200000"}  # WatchdogSec=0.2s: a ping every 0.1 s


@pytest.fixture
def swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-sd-", dir="/tmp"))  # short: AF_UNIX paths are limited
    tiny_llama().save_pretrained(root / MODEL)
    s = Swarm(root)
    yield s
    s.close()
    shutil.rmtree(root, ignore_errors=True)


def lines(messages: list[str]) -> list[str]:
    return [line for m in messages for line in m.splitlines()]


def read(daemon: Daemon, until: Callable[[list[str]], bool], timeout: float = 120.0) -> list[str]:
    """The lines of `daemon`'s notify datagrams from now on, read until `until(lines so far)` holds."""
    assert daemon.notify is not None
    got: list[str] = []
    deadline = time.monotonic() + timeout
    daemon.notify.settimeout(0.5)
    while not until(got):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{daemon.name} never sent what the test waits for; got {got[-20:]}\n{daemon.log()[-2000:]}"
            )
        try:
            got.extend(daemon.notify.recv(4096).decode().splitlines())
        except TimeoutError:
            continue
    return got


def test_ready_status_and_watchdog_pings_follow_the_daemon(swarm):
    # The client's WATCHDOG_PID names another process (as when a parent was the one systemd watches): no pings.
    client = swarm.make("c", "--new-swarm").start(extra_env={**WATCHDOG, "WATCHDOG_PID": "1"})
    assert "STATUS=client only, 0 peers" in client.notifications[-1].splitlines()  # sent with READY=1

    server = swarm.make(
        "s", "--initial-peer", client.address, "--serve", str(swarm.root / MODEL), "--blocks", "0:6"
    ).start(extra_env=WATCHDOG)
    started = lines(server.notifications)
    assert "STATUS=starting: joining the swarm" in started
    assert f"STATUS=starting: loading {MODEL} blocks 0:6" in started
    assert started.index("READY=1") > started.index(f"STATUS=starting: loading {MODEL} blocks 0:6")
    serving = f"STATUS=serving {MODEL} blocks 0:6, 1 peer, 0 sessions"
    got = read(server, lambda got: got.count("WATCHDOG=1") >= 3 and serving in started + got)
    assert got.count("WATCHDOG=1") >= 3

    # a state change on the client (a peer joined) shows in its status; its watchdog never pinged
    got = read(client, lambda got: "STATUS=client only, 1 peer" in got)
    assert "WATCHDOG=1" not in lines(client.notifications) + got

    # a session open on the server's blocks is counted, and its end too
    wait_for_route(client, MODEL, BLOCKS)
    opened = client.client.request("POST", "/v1/sessions", {"model": MODEL, "max_length": 8})
    read(server, lambda got: f"STATUS=serving {MODEL} blocks 0:6, 1 peer, 1 session" in got)
    client.client.request("DELETE", f"/v1/sessions/{opened['session']}")
    read(server, lambda got: serving in got)

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    got = read(server, lambda got: "STOPPING=1" in got)
    assert "STATUS=stopping" in got
    assert server.stop() == 0
