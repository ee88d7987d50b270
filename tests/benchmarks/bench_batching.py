"""Continuous batching (issue 12): aggregate decode tokens/s of 1, 4 and 16 concurrent sessions on one server.

One petald serves all blocks of the model (SmolLM2-135M: 30 blocks, fp32) on 1 torch thread; the client side (router
and sessions, libp2p, codec none) runs in this process, also on 1 torch thread. Each session opens, prefills
`--prefill` tokens, then decodes `--steps` steps of one token (random hidden states: the blocks' cost does not
depend on the values); the figure is (sessions x steps) / wall time of the decode phase, all sessions at once.
The daemon runs with batching on (`--max-batch-tokens`, default 1024) and off (`--max-batch-tokens 0`), restarted
for each, interleaved over `--rounds`; the table gives the median per setting and the ratio.

    .venv/bin/python tests/benchmarks/bench_batching.py [MODEL] [--rounds 2] [--steps 32] [--prefill 8]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.daemon.routing.session import InferenceSession
from petal.daemon.serving.plan import resolve_model_dir
from petal.kernels.store import open_model
from tests.benchmarks.bench_swarm_model import load
from tests.support.daemons import Swarm
from tests.support.swarms import Client

CONCURRENCY = (1, 4, 16)


async def decode(
    router: object, model: str, hidden: int, args: argparse.Namespace, start: asyncio.Event, ready: list[int]
) -> float:
    """One session: prefill, wait for every session to be ready, then `steps` decode steps; returns when it ended."""
    gen = torch.Generator().manual_seed(0)
    async with InferenceSession(router, model, max_length=args.prefill + args.steps + 1, codec="none") as s:  # type: ignore[arg-type]
        await s.step(torch.randn(1, args.prefill, hidden, generator=gen))
        x = torch.randn(1, 1, hidden, generator=gen)
        ready.append(1)
        await start.wait()
        for _ in range(args.steps):
            await s.step(x)
        return time.perf_counter()


async def measure(client: Client, model: str, hidden: int, n: int, args: argparse.Namespace) -> float:
    """Aggregate decode tokens/s of `n` concurrent sessions."""
    start, ready = asyncio.Event(), []
    tasks = [asyncio.ensure_future(decode(client.router, model, hidden, args, start, ready)) for _ in range(n)]
    for _ in range(1200):  # bounded: until every session has prefilled (it then waits on `start`)
        await asyncio.sleep(0.05)
        if len(ready) >= n or any(t.done() for t in tasks):
            break
    t0 = time.perf_counter()
    start.set()
    ends = await asyncio.gather(*tasks)
    return n * args.steps / (max(ends) - t0)


async def run_setting(path: Path, budget: int, args: argparse.Namespace) -> dict[int, float]:
    info = open_model(path)
    root = Path(tempfile.mkdtemp(prefix="petal-bb-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    swarm = Swarm(root)
    env = {"OMP_NUM_THREADS": "1", "PETAL_MODELS_DIR": str(path.parent)}
    try:
        daemon = swarm.make(
            "s0", "--new-swarm", "--serve", str(path), "--codec", "none", "--max-batch-tokens", str(budget)
        ).start(env)
        client = await Client().start(daemon.status()["dht_port"])
        try:
            for _ in range(120):  # bounded: until the route is announced
                try:
                    async with InferenceSession(client.router, info.name, max_length=4, codec="none") as s:
                        await s.step(torch.randn(1, 1, info.config.hidden_size))
                    break
                except Exception:  # noqa: BLE001 - not announced yet
                    await asyncio.sleep(0.5)
            out = {n: await measure(client, info.name, info.config.hidden_size, n, args) for n in CONCURRENCY}
            serving = daemon.status().get("serving", [{}])[0]
            print(
                f"  max-batch-tokens {budget}: "
                + ", ".join(f"{n} sessions {v:.1f} tok/s" for n, v in out.items())
                + f"; batches {serving.get('step_batches')}, batched steps {serving.get('step_batched_jobs')}, "
                f"largest {serving.get('step_largest_batch')}",
                flush=True,
            )
            return out
        finally:
            await client.stop()
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved on/off rounds (median per setting)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=8)
    parser.add_argument("--budget", type=int, default=1024, help="--max-batch-tokens of the 'on' daemon")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = Path(resolve_model_dir(args.model))
    info = open_model(path)
    print(
        f"model {info.name}: one daemon serving all {info.num_blocks} blocks (fp32, 1 torch thread), client in this "
        f"process; prefill {args.prefill}, {args.steps} decode steps per session, {args.rounds} rounds; "
        f"load average at start {load()}",
        flush=True,
    )
    runs: dict[str, list[dict[int, float]]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        runs["on"].append(await run_setting(path, args.budget, args))
        runs["off"].append(await run_setting(path, 0, args))
    print(f"\n| sessions | batching off: decode tok/s | batching on ({args.budget}): decode tok/s | on / off |")
    print("|---|---|---|---|")
    for n in CONCURRENCY:
        off = statistics.median(r[n] for r in runs["off"])
        on = statistics.median(r[n] for r in runs["on"])
        print(f"| {n} | {off:.1f} | {on:.1f} | {on / off:.2f}x |")
    print(f"load average at end {load()}")


if __name__ == "__main__":
    asyncio.run(main())
