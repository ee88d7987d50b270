"""Speculative decoding (prompt lookup) vs plain greedy decoding through real petald daemons on loopback.

Three servers host [0,10) [10,20) [20,30) of SmolLM2 (fp32, 1 torch thread each) and a client daemon serving
nothing; each prompt runs through the client's `/v1/generate` (codec none, greedy) with `speculative` 0 (plain) and
K, interleaved, `--rounds` times. Reported per setting: generated tokens per swarm step (round trip through the
chain), steps/s, tokens/s (wall time of the whole request, prefill included), and whether the tokens were equal.

    .venv/bin/python tests/benchmarks/bench_speculative.py [MODEL_DIR_OR_NAME] [--draft 4 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.ctl.client import Client
from petal.daemon.serving.plan import resolve_model_dir
from tests.support.daemons import Swarm

PROMPTS = {
    # quoting and editing the prompt: what prompt lookup is for
    "rewrite": "Rewrite this Python function with type hints, changing nothing else:\n\n"
    "def moving_average(values, window):\n    out = []\n    total = 0\n    for i, v in enumerate(values):\n"
    "        total += v\n        if i >= window:\n            total -= values[i - window]\n"
    "        if i >= window - 1:\n            out.append(total / window)\n    return out\n",
    # free text: little to look up
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(client: Client, model: str, prompt: str, tokens: int, draft: int) -> dict:
    body = {"model": model, "prompt": prompt, "chat": True, "max_new_tokens": tokens, "codec": "none"}
    if draft:
        body["speculative"] = draft
    t0 = time.perf_counter()
    *_, done = client.stream("POST", "/v1/generate", body)
    done["wall_s"] = time.perf_counter() - t0
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--draft", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = resolve_model_dir(args.model)
    root = Path(tempfile.mkdtemp(prefix="petal-spec-", dir="/tmp"))
    swarm = Swarm(root)
    env = {"OMP_NUM_THREADS": "1", "PETAL_MODELS_DIR": str(path.parent)}
    try:
        serve = ("--serve", str(path))
        boot = swarm.make("s0", "--new-swarm", *serve, "--blocks", "0:10").start(env)
        for i, span in ((1, "10:20"), (2, "20:30")):
            swarm.make(f"s{i}", "--initial-peer", boot.address, *serve, "--blocks", span).start(env)
        client_daemon = swarm.make("client", "--initial-peer", boot.address, "--codec", "none").start(env)
        client = Client(client_daemon.socket, timeout=600)
        run(client, path.name, "Hi", 4, 0)  # warm up: frontend loaded, route found
        print(
            f"{path.name}: 3 servers x 10 blocks + client daemon on loopback, fp32, 1 torch thread each, greedy, "
            f"{args.tokens} new tokens, {args.rounds} rounds (median)"
        )
        print("| prompt | speculative | tokens | steps | tokens/step | steps/s | tokens/s | speed-up | same tokens |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, prompt in PROMPTS.items():
            results: dict[int, list[dict]] = {d: [] for d in [0, *args.draft]}
            for _ in range(args.rounds):
                for draft in results:
                    results[draft].append(run(client, path.name, prompt, args.tokens, draft))
            base_tps = None
            for draft, runs in results.items():
                wall = statistics.median(r["wall_s"] for r in runs)
                n = len(runs[0]["tokens"])
                steps = runs[0]["speculative"]["steps"] if draft else n + (runs[0]["finish_reason"] == "stop")
                tps = n / wall
                base_tps = base_tps or tps
                same = all(r["tokens"] == results[0][0]["tokens"] for r in runs)
                print(
                    f"| {name} | {draft or 'off'} | {n} | {steps} | {n / steps:.2f} | {steps / wall:.1f} | "
                    f"{tps:.1f} | {tps / base_tps:.2f}x | {'yes' if same else 'NO'} |"
                )
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
