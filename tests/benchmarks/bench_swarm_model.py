"""A whole model through real petald daemons on loopback vs the same blocks in one local process.

Three set-ups, the same random inputs and torch thread count in all:
  local   one process, `load_span` of all blocks (no daemons, no wire);
  1 hop   one daemon serving every block + a client daemon with none; `petalctl bench` talks to the client's socket;
  3 hops  three daemons serving [0,n/3) [n/3,2n/3) [2n/3,n) + a client daemon; the same `petalctl bench`.
So (t_3hops - t_1hop) / 2 is what one more server in the chain costs per decode step.

    .venv/bin/python tests/benchmarks/bench_swarm_model.py [MODEL_DIR_OR_NAME] [--codec none|q8] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.daemon.serving.plan import resolve_model_dir
from petal.kernels.store import load_span, open_model
from tests.support.daemons import Daemon, Swarm

PETALCTL = [sys.executable, "-c", "from petal.ctl.cli import main; main()"]


def inputs(batch: int, tokens: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `petalctl bench --seed` draws: one decode input [B,1,H], then the forward input [B,T,H]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, hidden, generator=gen), torch.randn(batch, tokens, hidden, generator=gen)


class Local:
    """All blocks in this process, timed the way `petalctl bench` times the swarm."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        info = open_model(path)
        self.span = load_span(info, 0, info.num_blocks)
        self.args = args
        self.x, self.h = inputs(args.batch, args.tokens, self.span.hidden_size, args.seed)

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        args, span = self.args, self.span
        cache = span.new_cache(args.batch, args.steps + 1, torch.float32, "cpu")
        span.step(self.x, cache)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            span.step(self.x, cache)
        decode_s = time.perf_counter() - t0
        span.forward(self.h)
        t0 = time.perf_counter()
        span.forward(self.h)
        return {"decode_ms_per_step": 1000 * decode_s / args.steps, "forward_s": time.perf_counter() - t0}


class Daemons:
    """A swarm of its own (serving daemons cut at `cuts` + a client daemon with no blocks); `run` is one bench."""

    def __init__(self, name: str, path: Path, cuts: list[tuple[int, int]], args: argparse.Namespace) -> None:
        info = open_model(path)
        self.root = Path(tempfile.mkdtemp(prefix=f"petal-{name}-", dir="/tmp"))  # short: AF_UNIX paths <= 108 bytes
        self.swarm = Swarm(self.root)
        env = {"OMP_NUM_THREADS": str(args.threads), "PETAL_MODELS_DIR": str(path.parent)}
        serve = ("--serve", str(path), "--codec", args.codec)
        try:
            boot = self.swarm.make("s0", "--new-swarm", *serve, "--blocks", f"{cuts[0][0]}:{cuts[0][1]}").start(env)
            for i, (a, b) in enumerate(cuts[1:], 1):
                self.swarm.make(f"s{i}", "--initial-peer", boot.address, *serve, "--blocks", f"{a}:{b}").start(env)
            client = self.swarm.make("client", "--initial-peer", boot.address, "--codec", args.codec).start(env)
            self.route = wait_for_route(client, info.name, info.num_blocks)
        except BaseException:
            self.close()
            raise
        self.cmd = [
            *PETALCTL,
            "--socket",
            str(client.socket),
            "bench",
            "-m",
            info.name,
            "--json",
            "--codec",
            args.codec,
            "--steps",
            str(args.steps),
            "--tokens",
            str(args.tokens),
            "--batch",
            str(args.batch),
            "--hidden-size",
            str(info.config.hidden_size),
            "--seed",
            str(args.seed),
        ]

    def run(self) -> dict[str, float]:
        done = subprocess.run(self.cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"petalctl bench failed ({done.returncode}): {done.stdout}{done.stderr}")
        out = json.loads(done.stdout)
        self.route = out["route"]
        return {"decode_ms_per_step": out["decode_ms_per_step"], "forward_s": out["forward_s"]}

    def close(self) -> None:
        self.swarm.close()
        shutil.rmtree(self.root, ignore_errors=True)


def summarize(runs: list[dict[str, float]], args: argparse.Namespace, pick) -> dict[str, float]:
    """`pick` (median or min) over the repeats; rates derive from the picked times."""
    ms = pick(r["decode_ms_per_step"] for r in runs)
    fwd = pick(r["forward_s"] for r in runs)
    return {
        "decode_ms_per_step": ms,
        "decode_steps_per_s": 1000 / ms,
        "forward_s": fwd,
        "forward_tokens_per_s": args.batch * args.tokens / fwd,
    }


def wait_for_route(client: Daemon, model: str, num_blocks: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chain = client.client.get(f"/v1/route?model={model}")["chain"]
            if chain and chain[0]["start"] == 0 and chain[-1]["end"] == num_blocks:
                return chain
        except Exception:  # noqa: BLE001 - not announced yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no route over {model} after {timeout} s; see the logs in {client.state_dir.parent}")


def thirds(n: int) -> list[tuple[int, int]]:
    bounds = [round(i * n / 3) for i in range(4)]
    return list(itertools.pairwise(bounds))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--codec", choices=["none", "q8"], default="none")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every daemon and in the baseline")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each set-up (median and best)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(resolve_model_dir(args.model))
    info = open_model(path)
    print(
        f"model {info.name} ({info.num_blocks} blocks, hidden {info.config.hidden_size}), codec {args.codec}, "
        f"torch threads {args.threads}, batch {args.batch}, {args.steps} decode steps, forward of {args.tokens} "
        f"tokens, {args.repeats} interleaved repeats; load average at start {load()}"
    )
    setups: dict[str, Local | Daemons] = {"local": Local(path, args)}
    try:
        setups["1 hop"] = Daemons("1hop", path, [(0, info.num_blocks)], args)
        setups["3 hops"] = Daemons("3hops", path, thirds(info.num_blocks), args)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        for _ in range(args.repeats):  # interleaved, so a burst of load from other jobs hits every set-up alike
            for name, setup in setups.items():
                runs[name].append(setup.run())
    finally:
        for setup in setups.values():
            if isinstance(setup, Daemons):
                setup.close()
    print(
        "routes: "
        + "; ".join(
            f"{name} " + " -> ".join(f"{h['start']}:{h['end']}" for h in setup.route)
            for name, setup in setups.items()
            if isinstance(setup, Daemons)
        )
    )
    for label, pick in (("median", statistics.median), ("best", min)):
        print(f"-- {label} of {args.repeats}")
        table({name: summarize(r, args, pick) for name, r in runs.items()}, args)
    print(f"load average at end {load()}")


def table(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    base = rows["local"]
    print(
        f"{'set-up':8s} {'decode steps/s':>15s} {'ms/step':>9s} {'x local':>8s} {'forward tok/s':>14s} {'x local':>8s}"
    )
    for name, r in rows.items():
        print(
            f"{name:8s} {r['decode_steps_per_s']:15.2f} {r['decode_ms_per_step']:9.2f} "
            f"{r['decode_steps_per_s'] / base['decode_steps_per_s']:8.3f} {r['forward_tokens_per_s']:14.1f} "
            f"{r['forward_tokens_per_s'] / base['forward_tokens_per_s']:8.3f}"
        )
    hop_ms = (rows["3 hops"]["decode_ms_per_step"] - rows["1 hop"]["decode_ms_per_step"]) / 2
    hop_fwd_ms = 1000 * (rows["3 hops"]["forward_s"] - rows["1 hop"]["forward_s"]) / 2
    print(
        f"per-hop overhead: decode {hop_ms:.2f} ms/step, forward {hop_fwd_ms:.1f} ms per {args.batch}x{args.tokens} "
        "forward"
    )


if __name__ == "__main__":
    main()
