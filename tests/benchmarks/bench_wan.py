"""SmolLM2 over 3 servers on emulated WAN links: the network conditions of the Petals paper's Table 3 (plus 10 ms
round trips with 1 % loss), decode steps/s and forward tokens/s beside the latency limit of each condition.

Every daemon runs in its own network namespace (tests/support/netns.py; root only): servers s0, s1, s2 hold blocks
0:10, 10:20, 20:30 and a client daemon c drives them through its socket (hidden states in, hidden states out: the
blocks only, as in the paper's table). Each condition shapes every host's egress alike (rate, half the round trip,
loss), so every link has that rate and round trip.

The latency limit of a condition is what this code would reach if the network added only its delays: the step time
with no shaping at all (compute, serialization, the daemons' own overhead) plus the one-way delays a step must cross.
The baseline is measured in rounds alternating with the condition's, and medians taken, as the shared machine's load
drifts within minutes. A pushed decode step crosses 4 one-way delays (client -> s0 -> s1 -> s2 -> client), one
without push 6 (client <-> each server); the limit counts 4 for both rows, so the no-push ratio shows what push saves.
A forward pass is sent by the client to each server in turn: 6 one-way delays plus 6 transfers of the activations at
the link's rate.

    sudo .venv/bin/python tests/benchmarks/bench_wan.py [--steps 16 --rounds 3 --tokens 128]
    sudo .venv/bin/python tests/benchmarks/bench_wan.py --conditions wan --codecs none --json wan.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tests.support.netns import Lab, netem_available

MODEL = "smollm2"


@dataclass(frozen=True)
class Condition:
    name: str
    label: str
    rate_mbit: float | None
    rtt_ms: float
    loss_pct: float = 0.0


CONDITIONS = {
    "none": Condition("none", "no shaping (the compute baseline)", None, 0.0),
    "fast": Condition("fast", "1 Gbit/s, < 5 ms", 1000.0, 0.0),
    "100mbit": Condition("100mbit", "100 Mbit/s, < 5 ms", 100.0, 0.0),
    "wan": Condition("wan", "100 Mbit/s, 100 ms RTT", 100.0, 100.0),
    "lossy": Condition("lossy", "1 Gbit/s, 10 ms RTT, 1 % loss", 1000.0, 10.0, 1.0),
}
HOSTS = ("s0", "s1", "s2", "c")


def shape(lab: Lab, cond: Condition) -> None:
    for host in HOSTS:
        lab.shape(host, delay_ms=cond.rtt_ms / 2, rate_mbit=cond.rate_mbit, loss_pct=cond.loss_pct)


def decode(client, hidden: int, steps: int, prefill: int, codec: str, push: bool) -> float:
    """Seconds per decode step (median of ``steps`` one-token steps after a prefill)."""
    times = []
    with client.session_stream(MODEL, max_length=prefill + steps + 1, codec=codec, push=push) as s:
        s.step(torch.randn(1, prefill, hidden))
        for _ in range(steps):
            t0 = time.perf_counter()
            s.step(torch.randn(1, 1, hidden))
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward(client, hidden: int, tokens: int, codec: str, reps: int) -> float:
    """Seconds of one forward pass of ``tokens`` tokens through all blocks (best of ``reps``)."""
    best = float("inf")
    x = torch.randn(1, tokens, hidden)
    for _ in range(reps):
        t0 = time.perf_counter()
        client.forward(MODEL, x, codec=codec)
        best = min(best, time.perf_counter() - t0)
    return best


def wire_bytes(tokens: int, hidden: int, codec: str) -> float:
    """Bytes of one activation tensor on the wire (q8: one byte per value plus a float32 scale per 64)."""
    values = tokens * hidden
    return values * (1 + 4 / 64) if codec == "q8" else values * 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16, help="decode steps per round (their median counts)")
    p.add_argument("--prefill", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="tokens of a forward pass (batch 1)")
    p.add_argument("--reps", type=int, default=2, help="forward passes per round (the best counts)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of baseline and condition (medians)")
    p.add_argument("--conditions", default="fast,100mbit,wan,lossy")
    p.add_argument("--codecs", default="none,q8")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    conditions = [CONDITIONS[c] for c in args.conditions.split(",")]
    codecs = args.codecs.split(",")
    hidden = json.loads((Path.home() / ".local/share/petal/models/smollm2/config.json").read_text())["hidden_size"]
    root = Path(tempfile.mkdtemp(prefix="petal-bw-", dir="/tmp"))
    lab = Lab(root)
    rows = []
    try:
        for host in HOSTS:
            lab.add_host(host)
        env = {"OMP_NUM_THREADS": "1"}
        t0 = time.monotonic()
        s0 = lab.daemon("s0", "s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:10").start(env)
        specs = [("s1", ("--serve", MODEL, "--blocks", "10:20")), ("s2", ("--serve", MODEL, "--blocks", "20:30")),
                 ("c", ())]  # fmt: skip
        with ThreadPoolExecutor(max_workers=3) as pool:
            daemons = list(
                pool.map(lambda s: lab.daemon(s[0], s[0], "--initial-peer", s0.address, *s[1]).start(env), specs)
            )
        client = daemons[-1].client
        client.timeout = 600
        print(f"4 daemons up in {time.monotonic() - t0:.0f} s; delays by {'netem' if netem_available() else 'NFQUEUE'}")
        for _ in range(60):  # the route over all three servers
            try:
                client.forward(MODEL, torch.randn(1, 4, hidden), codec="none")
                break
            except Exception:  # noqa: BLE001 - the last server's record may not be readable yet
                time.sleep(1.0)
        for cond in conditions:
            for codec in codecs:
                # alternate rounds of the baseline and the condition, and take medians: the machine is shared, and
                # its load drifts within minutes
                base_steps, base_fwds, fwds = [], [], []
                steps: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.rounds):
                    shape(lab, CONDITIONS["none"])
                    base_steps.append(decode(client, hidden, args.steps, args.prefill, codec, True))
                    base_fwds.append(forward(client, hidden, args.tokens, codec, args.reps))
                    shape(lab, cond)
                    fwds.append(forward(client, hidden, args.tokens, codec, args.reps))
                    for push in (True, False):
                        steps[push].append(decode(client, hidden, args.steps, args.prefill, codec, push))
                fwd, base_fwd, base_step = (statistics.median(x) for x in (fwds, base_fwds, base_steps))
                transfer = wire_bytes(args.tokens, hidden, codec) * 8 / (cond.rate_mbit * 1e6) if cond.rate_mbit else 0
                fwd_limit = base_fwd + 6 * cond.rtt_ms / 2e3 + 6 * transfer
                limit = base_step + 4 * cond.rtt_ms / 2e3
                for push in (True, False):
                    step = statistics.median(steps[push])
                    row = dict(
                        condition=cond.label,
                        codec=codec,
                        push=push,
                        steps_per_s=1 / step,
                        step_limit_per_s=1 / limit,
                        step_ratio=limit / step,
                        forward_tokens_per_s=args.tokens / fwd,
                        forward_limit_tokens_per_s=args.tokens / fwd_limit,
                        forward_ratio=fwd_limit / fwd,
                    )
                    rows.append(row)
                    print(
                        f"{cond.label:30s} {codec:4s} push {'on ' if push else 'off'} decode {row['steps_per_s']:6.2f} "
                        f"steps/s (limit {row['step_limit_per_s']:6.2f}, ratio {row['step_ratio']:.2f})   forward "
                        f"{row['forward_tokens_per_s']:7.1f} tokens/s (limit {row['forward_limit_tokens_per_s']:7.1f}, "
                        f"ratio {row['forward_ratio']:.2f})",
                        flush=True,
                    )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
