"""Decode steps through the control socket: one WebSocket stream per session vs one HTTP request per step.

Three petald daemons serve a third of the model's blocks each and a fourth (no blocks) is the client's daemon, all
on loopback; this process is the client (`petal.ctl.client.Client`). Each repeat opens one session of each kind
(the order alternates between repeats, so load drift hits both alike), runs one untimed step, then `--steps`
single-token decode steps. Prints steps/s and ms/step (median and best over the repeats) for both, and the time a
step saves on the stream. The swarm is the same for both, so the difference is the socket's per-step cost; it is
also measured alone, as the round trip of a step the daemon refuses before any swarm work (wrong hidden size).

    .venv/bin/python tests/benchmarks/bench_socket_session.py                  # SmolLM2 from the local store
    .venv/bin/python tests/benchmarks/bench_socket_session.py --tiny           # tiny random 30-block Llama
    .venv/bin/python tests/benchmarks/bench_socket_session.py MODEL_DIR --codec q8 --steps 64 --repeats 9
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.ctl.client import Client, DaemonError
from petal.daemon.serving.plan import resolve_model_dir
from petal.kernels.store import open_model
from tests.support.daemons import Swarm, wait_for_route
from tests.support.tinymodels import tiny_llama


def thirds(n: int) -> list[tuple[int, int]]:
    bounds = [round(i * n / 3) for i in range(4)]
    return list(itertools.pairwise(bounds))


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run(client: Client, model: str, hidden: int, args: argparse.Namespace, stream: bool) -> float:
    """ms per decode step of one session of the given kind."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, 1, hidden, generator=gen)
    open_session = client.session_stream if stream else client.open_session
    with open_session(model, args.steps + 1, codec=args.codec) as session:
        session.step(x)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            session.step(x)
        return 1000 * (time.perf_counter() - t0) / args.steps


def refused(client: Client, model: str, hidden: int, args: argparse.Namespace, stream: bool) -> float:
    """ms per round trip of a step the daemon refuses before any swarm work (wrong hidden size): the socket alone."""
    bad = torch.zeros(1, 1, hidden + 1)
    open_session = client.session_stream if stream else client.open_session
    with open_session(model, 2, codec=args.codec) as session:
        t0 = time.perf_counter()
        for _ in range(args.refused):
            with contextlib.suppress(DaemonError):
                session.step(bad)
        return 1000 * (time.perf_counter() - t0) / args.refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--tiny", action="store_true", help="a tiny random 30-block Llama instead of `model`")
    parser.add_argument("--codec", choices=["none", "q8"], default="none")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every daemon")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refused", type=int, default=200, help="refused steps per repeat (the socket alone)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="petal-bs-", dir="/tmp"))  # short: AF_UNIX paths <= 108 bytes
    try:
        if args.tiny:
            path = root / "models" / "tiny-llama"
            tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64).save_pretrained(
                path, safe_serialization=True
            )
        else:
            path = Path(resolve_model_dir(args.model))
        info = open_model(path)
        print(
            f"model {info.name} ({info.num_blocks} blocks, hidden {info.config.hidden_size}), codec {args.codec}, "
            f"torch threads {args.threads}, {args.steps} decode steps, {args.repeats} interleaved repeats; "
            f"load average at start {load()}"
        )
        swarm = Swarm(root)
        env = {"OMP_NUM_THREADS": str(args.threads), "PETAL_MODELS_DIR": str(path.parent)}
        serve = ("--serve", str(path))
        try:
            cuts = thirds(info.num_blocks)
            boot = swarm.make("s0", "--new-swarm", *serve, "--blocks", f"{cuts[0][0]}:{cuts[0][1]}").start(env)
            for i, (a, b) in enumerate(cuts[1:], 1):
                swarm.make(f"s{i}", "--initial-peer", boot.address, *serve, "--blocks", f"{a}:{b}").start(env)
            daemon = swarm.make("client", "--initial-peer", boot.address).start(env)
            wait_for_route(daemon, info.name, info.num_blocks)
            client = Client(daemon.socket, timeout=300)
            hidden = int(info.config.hidden_size)
            runs: dict[str, list[float]] = {"stream": [], "http": []}
            socket_only: dict[str, list[float]] = {"stream": [], "http": []}
            for r in range(args.repeats):
                for kind in ("stream", "http") if r % 2 == 0 else ("http", "stream"):
                    runs[kind].append(run(client, info.name, hidden, args, kind == "stream"))
                    socket_only[kind].append(refused(client, info.name, hidden, args, kind == "stream"))
        finally:
            swarm.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'session':8s} {'pick':6s} {'steps/s':>9s} {'ms/step':>9s}")
    for kind, ms in runs.items():
        for label, pick in (("median", statistics.median), ("best", min)):
            print(f"{kind:8s} {label:6s} {1000 / pick(ms):9.2f} {pick(ms):9.3f}")
    saved = statistics.median(runs["http"]) - statistics.median(runs["stream"])
    ratio = statistics.median(runs["http"]) / statistics.median(runs["stream"])
    print(f"stream vs http (medians): {ratio:.3f}x steps/s, {saved:.3f} ms saved per step")
    print(f"socket alone (a refused step, {args.refused} per repeat), ms per round trip, median / best:")
    for kind, ms in socket_only.items():
        print(f"  {kind:8s} {statistics.median(ms):7.3f} / {min(ms):7.3f}")
    print(f"load average at end {load()}")


if __name__ == "__main__":
    main()
