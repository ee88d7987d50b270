"""Failover with real petald processes over libp2p: a server SIGKILLed mid-generation changes no token.

Four serving daemons host a tiny random 30-block Llama: [0, 10), two of [10, 20), and [20, 30). The client side
(router + session, embeddings and head) runs in the test process with its own libp2p transport and DHT node joined
to the swarm, until the control API exposes sessions.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from petal.daemon.routing.session import InferenceSession
from tests.support.daemons import Swarm
from tests.support.swarms import Client
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
ROUNDS = 5
NEW_TOKENS = 32
KILL_AFTER = 10


@pytest.fixture(scope="module")
def model_dir():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    model = tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64)
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


async def generate(client, model, prompt, kill=None):
    """Greedy tokens; `kill(session)` is called after KILL_AFTER tokens."""
    tokens = []
    async with InferenceSession(client.router, MODEL, max_length=prompt.shape[1] + NEW_TOKENS) as s:
        with torch.no_grad():
            h = await s.step(model.model.embed_tokens(prompt))
            for i in range(NEW_TOKENS):
                nxt = model.lm_head(model.model.norm(h[:, -1])).argmax(-1)
                tokens.append(int(nxt))
                if kill is not None and i + 1 == KILL_AFTER:
                    kill(s)
                if i + 1 < NEW_TOKENS:
                    h = await s.step(model.model.embed_tokens(nxt[:, None]))
        return tokens, s.failovers


async def test_sigkilled_server_changes_no_token(swarm, model_dir):
    path, model = model_dir
    serve = ("--serve", str(path))
    t0 = time.monotonic()
    first = swarm.start_bootstrap("s0", *serve, "--blocks", "0:10")
    boot_addr = first.address
    middle: dict[str, object] = {}
    pool = ThreadPoolExecutor(max_workers=3)

    def start(name: str, blocks: str):  # daemons start in threads: their startup is mostly waiting
        return pool.submit(lambda: swarm.make(name, "--initial-peer", boot_addr, *serve, "--blocks", blocks).start())

    def add_middle(future) -> None:
        d = future.result()
        middle[d.status()["peer_id"]] = d

    starting = [start("s3", "20:30"), start("m0", "10:20"), start("m1", "10:20")]
    starting[0].result()
    for f in starting[1:]:
        add_middle(f)
    client = await Client().start(first.status()["dht_port"])
    print(f"4 serving daemons up in {time.monotonic() - t0:.2f} s")
    try:
        prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(7))
        want, failovers = await generate(client, model, prompt)
        assert failovers == 0 and len(want) == NEW_TOKENS
        # concurrent sessions (continuous batching on the servers, issue 12): each equals its generation alone
        other = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(8))
        want_other, _ = await generate(client, model, other)
        together = await asyncio.gather(*(generate(client, model, p) for p in (prompt, other, prompt, other)))
        assert [t for t, _ in together] == [want, want_other, want, want_other]
        daemons = [first, *middle.values()]
        batches = sum(s.get("step_batches", 0) for d in daemons for s in d.status().get("serving", []))
        print(f"4 concurrent sessions: equal to each alone; {batches} batched steps on the first two hops' servers")
        killed = []
        replacement = []

        def kill_middle(session):
            victim = next(h.peer_id for h in session.chain if h.start <= 10 < h.end)
            middle.pop(victim).kill()  # SIGKILL: no withdrawal, streams drop mid-session
            killed.append(victim)
            replacement.append(start(f"m{len(killed) + 1}", "10:20"))  # back to two servers for the next round

        for r in range(ROUNDS):
            t0 = time.monotonic()
            got, failovers = await generate(client, model, prompt, kill=kill_middle)
            t1 = time.monotonic()
            assert failovers == 1, f"round {r}: the session should have replaced exactly one hop"
            assert got == want, f"round {r}: tokens differ after failover"
            add_middle(replacement[-1])
            print(
                f"round {r}: generation with failover {t1 - t0:.2f} s, "
                f"waiting for the new server {time.monotonic() - t1:.2f} s"
            )
        assert len(set(killed)) == ROUNDS
    finally:
        pool.shutdown(wait=True)
        await client.stop()
