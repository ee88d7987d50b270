"""How much a busy neighbour slows a span's decode step on this machine (why each extra hop costs compute too).

In a chain with push, hop i's reply to the client, the push ack and the client's bookkeeping run on the other
core while hop i+1 computes. On a machine whose cores share a physical core (SMT siblings, or a VM's vCPUs on one
host core) that work slows the compute itself. This times `Span.step` of one token over the same blocks alone and
while a second process spins in Python, interleaved in rounds.

    .venv/bin/python tests/benchmarks/bench_interference.py [MODEL_DIR_OR_NAME] [--blocks 0:10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from petal.daemon.serving.placement import parse_blocks
from petal.daemon.serving.plan import resolve_model_dir
from petal.kernels.store import load_span, open_model

SPIN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass\n"


def step_ms(span, steps: int) -> float:
    """Median ms of one decode step (one token, KV cache growing), after one untimed step."""
    x = torch.randn(1, 1, span.hidden_size)
    cache = span.new_cache(1, steps + 1, torch.float32, "cpu")
    times = []
    with torch.no_grad():
        span.step(x, cache)
        for _ in range(steps):
            t0 = time.perf_counter()
            span.step(x, cache)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--blocks", default="0:10")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = open_model(Path(resolve_model_dir(args.model)))
    start, end = parse_blocks(args.blocks, info.num_blocks)
    span = load_span(info, start, end)
    alone, busy = [], []
    for _ in range(args.rounds):
        alone.append(step_ms(span, args.steps))
        spinner = subprocess.Popen([sys.executable, "-c", SPIN])
        try:
            time.sleep(0.2)
            busy.append(step_ms(span, args.steps))
        finally:
            spinner.kill()
            spinner.wait()
    a, b = statistics.median(alone), statistics.median(busy)
    print(f"{info.name} blocks {start}:{end}, 1 torch thread, median of {args.rounds} rounds x {args.steps} steps")
    print(f"alone:                            {a:7.2f} ms/step   (rounds: {', '.join(f'{v:.1f}' for v in alone)})")
    print(f"a Python spinner on another core: {b:7.2f} ms/step   (rounds: {', '.join(f'{v:.1f}' for v in busy)})")
    print(f"slowdown: {100 * (b / a - 1):.0f} %")


if __name__ == "__main__":
    main()
