"""The cost of spot checks: decode steps/s with spot checks off, at the default rate, and on every hop.

In one process (tests/support/swarms.py ``LocalSwarm``: real BlockServers and frames over in-memory transport, an
in-memory DHT), two spans of the model, each served twice (so every hop has a reference server). Each round opens
one session per rate, in an order that alternates between rounds so load drift hits every rate alike; a session
prefills ``--prompt`` tokens and then runs ``--steps`` single-token decode steps, timed. A check re-runs the hop's
whole history on the other server as one forward, so its cost grows with the session's length.

    .venv/bin/python tests/benchmarks/bench_spotcheck.py                  # SmolLM2-135M (pulled if missing)
    .venv/bin/python tests/benchmarks/bench_spotcheck.py --tiny --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from petal.daemon.routing.session import InferenceSession
from petal.daemon.routing.spotcheck import DEFAULT_RATE
from tests.support import swarms
from tests.support.swarms import LocalSwarm


def load_model(tiny: bool) -> torch.nn.Module:
    if tiny:
        from tests.support.tinymodels import tiny_llama

        return tiny_llama(num_hidden_layers=30, hidden_size=64, intermediate_size=128)
    from transformers import AutoModelForCausalLM

    from petal.daemon.pull import pull_model

    return AutoModelForCausalLM.from_pretrained(pull_model("smollm2", progress=False), dtype=torch.float32)


async def session_rate(swarm: LocalSwarm, model: torch.nn.Module, rate: float, prompt: int, steps: int) -> float:
    """Decode steps/s of one session with spot checks at ``rate``."""
    swarm.router.spot.rate = rate
    ids = torch.randint(0, 100, (1, prompt), generator=torch.Generator().manual_seed(0))
    async with InferenceSession(swarm.router, swarms.MODEL, max_length=prompt + steps + 1, codec="none") as s:
        with torch.no_grad():
            await s.step(model.model.embed_tokens(ids))
            token = ids[:, -1:]
            t0 = time.perf_counter()
            for _ in range(steps):
                await s.step(model.model.embed_tokens(token))
            return steps / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model = load_model(args.tiny).eval()
    n = model.config.num_hidden_layers
    swarms.N = n
    swarm = LocalSwarm(model)
    await swarm.start()
    for a, b in [(0, n // 2), (0, n // 2), (n // 2, n), (n // 2, n)]:
        await swarm.add(a, b)

    async def reannounce() -> None:  # LocalSwarm's entries live 120 s; a long run must keep them
        while True:
            await asyncio.sleep(30)
            for server, _, _ in swarm.servers.values():
                await server.publish("online")

    keeper = asyncio.create_task(reannounce())
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[float, list[float]] = {r: [] for r in rates}
    checks: dict[float, int] = dict.fromkeys(rates, 0)
    await session_rate(swarm, model, 0.0, args.prompt, 2)  # warm-up (probes, first allocations)
    for i in range(args.rounds):
        for rate in rates if i % 2 == 0 else rates[::-1]:
            before = swarm.router.spot.checks
            results[rate].append(await session_rate(swarm, model, rate, args.prompt, args.steps))
            checks[rate] += swarm.router.spot.checks - before
        print(f"round {i + 1}: " + ", ".join(f"rate {r}: {results[r][-1]:.2f} steps/s" for r in rates), flush=True)
    keeper.cancel()
    base = statistics.median(results[rates[0]])
    name = "tiny random 30-block Llama" if args.tiny else "SmolLM2-135M fp32"
    print(f"\n{name}, 2 spans x 2 servers, prompt {args.prompt}, {args.steps} decode steps x {args.rounds} rounds")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print("| spot-check rate | steps/s median (min-max) | vs off | hops re-run (prefills included) |")
    print("|---|---:|---:|---:|")
    for r in rates:
        med = statistics.median(results[r])
        print(
            f"| {r} | {med:.2f} ({min(results[r]):.2f}-{max(results[r]):.2f}) | {med / base:.3f} | "
            f"{checks[r]} of {2 * (args.steps + 1) * args.rounds} |"
        )
    await swarm.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random 30-block Llama instead of SmolLM2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rates", default=f"0,{DEFAULT_RATE},1", help="comma-separated; the first is the baseline")
    asyncio.run(main(parser.parse_args()))
