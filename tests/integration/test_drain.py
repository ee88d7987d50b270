"""Graceful drain with real petald processes: SIGTERM a server while a generation runs through it, with a redundant
server for its blocks. The server announces "draining", takes no new sessions, lets the open one finish, and exits 0
within its drain bound; the generation's tokens are those of an undisturbed run, and a generation started while it
drains gets the same tokens too (it never needs the leaving server).

Three daemons host a tiny random 6-block Llama: [0, 3) (the bootstrap) and two of [3, 6). The client side runs in
the test process (router, session, embeddings and head), as in test_session_daemons.py.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from petal.daemon.routing.session import InferenceSession
from petal.daemon.serving.settings import DEFAULT_SETTINGS
from tests.support.daemons import Daemon, Swarm
from tests.support.swarms import Client
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
NEW_TOKENS = 24
SIGTERM_AFTER = 8
EXIT_SLACK = 15.0  # seconds beyond the drain bound for the rest of a clean stop (withdrawing, closing the DHT)


@pytest.fixture(scope="module")
def model_dir():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    model = tiny_llama(num_hidden_layers=6, hidden_size=32, intermediate_size=64)
    model.save_pretrained(root / MODEL, safe_serialization=True)
    yield root / MODEL, model
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def swarm():
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    yield s
    s.close()
    shutil.rmtree(root, ignore_errors=True)


async def generate(client, model, prompt, at=None):
    """Greedy tokens; `await at(session)` runs after SIGTERM_AFTER tokens."""
    tokens = []
    async with InferenceSession(client.router, MODEL, max_length=prompt.shape[1] + NEW_TOKENS) as s:
        # no_grad blocks never span an await: grad mode is per thread, and two generations run at once here
        with torch.no_grad():
            x = model.model.embed_tokens(prompt)
        h = await s.step(x)
        for i in range(NEW_TOKENS):
            with torch.no_grad():
                nxt = model.lm_head(model.model.norm(h[:, -1])).argmax(-1)
            tokens.append(int(nxt))
            if at is not None and i + 1 == SIGTERM_AFTER:
                await at(s)
            if i + 1 < NEW_TOKENS:
                with torch.no_grad():
                    x = model.model.embed_tokens(nxt[:, None])
                h = await s.step(x)
        return tokens, s.failovers


async def test_sigterm_drains_a_server_without_changing_a_token(swarm, model_dir):
    path, model = model_dir
    serve = ("--serve", str(path))
    boot = swarm.start_bootstrap("s0", *serve, "--blocks", "0:3")
    middle: dict[str, Daemon] = {}
    for name in ("m0", "m1"):
        d = swarm.make(name, "--initial-peer", boot.address, *serve, "--blocks", "3:6").start()
        middle[d.status()["peer_id"]] = d
    client = await Client().start(boot.status()["dht_port"])
    try:
        prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(11))
        want, _ = await generate(client, model, prompt)
        assert len(want) == NEW_TOKENS
        leaving: list[Daemon] = []
        during: list[asyncio.Task] = []

        async def sigterm_the_middle_hop(session) -> None:
            victim = next(h.peer_id for h in session.chain if h.start <= 3 < h.end)
            daemon = middle[victim]
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            leaving.append(daemon)
            await asyncio.sleep(0.5)  # the signal lands and the server announces it is leaving
            during.append(asyncio.create_task(generate(client, model, prompt)))  # a new session while it drains

        got, failovers = await generate(client, model, prompt, at=sigterm_the_middle_hop)
        assert got == want, "tokens differ: the draining server's open session should have finished normally"
        assert failovers == 0, "the open session should have finished on the draining server, not failed over"
        again, _ = await during[0]
        assert again == want, "a generation started during the drain gave different tokens"
        daemon = leaving[0]
        assert daemon.proc is not None
        try:
            code = daemon.proc.wait(timeout=DEFAULT_SETTINGS.drain_timeout + EXIT_SLACK)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the drained server did not exit within its bound:\n{daemon.log()[-3000:]}")
        assert code == 0, daemon.log()[-3000:]
        log = daemon.log()
        assert "draining" in log, log[-3000:]
    finally:
        await client.stop()
