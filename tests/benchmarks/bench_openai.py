"""The OpenAI endpoints on a real model: how far their numbers are from transformers, and what the extras cost.

One petald daemon serves all of SmolLM2's blocks on loopback and is its own client (so the figures are the
endpoints' and the head's cost, not the network's); this process talks to it with the real `openai` client. Prints
the max |difference| from transformers (float32, same weights) of greedy logprobs, echo (prompt) logprobs and
embeddings, then the median seconds (over `--repeats`) of: a greedy completion with and without `logprobs=5`,
scoring a prompt with `echo` and `max_tokens=0`, and embedding a batch of texts.

    .venv/bin/python tests/benchmarks/bench_openai.py [--tokens 32] [--prompt-tokens 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from petal.daemon.pull import pull_model
from tests.support.daemons import Swarm, wait_for_route

MODEL = "smollm2"


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = pull_model(MODEL, progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))
    swarm = Swarm(root)
    try:
        env = {"PETAL_MODELS_DIR": str(model_dir.parent)}
        daemon = swarm.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:30").start(extra_env=env)
        wait_for_route(daemon, MODEL, 30)
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=600)
        client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)

        prompt = "The history of the city of Paris begins"
        ids = tok(prompt)["input_ids"]
        done = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0, logprobs=5)
        new = tok(done.choices[0].text, add_special_tokens=False)["input_ids"][:16]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ids + new])).logits[0].float(), -1)
        got = done.choices[0].logprobs.token_logprobs
        greedy_diff = max(abs(got[i] - float(logp[len(ids) - 1 + i, t])) for i, t in enumerate(new[: len(got)]))

        words = ("the quick brown fox jumps over the lazy dog and " * 200).split()
        long_ids = tok(" ".join(words))["input_ids"][: args.prompt_tokens]
        scored = client.completions.create(model=MODEL, prompt=long_ids, max_tokens=0, echo=True, logprobs=1)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([long_ids])).logits[0].float(), -1)
        lps = scored.choices[0].logprobs.token_logprobs
        echo_diff = max(abs(lps[i] - float(logp[i - 1, long_ids[i]])) for i in range(1, len(long_ids)))

        texts = [f"Sentence number {i} is about {w}." for i, w in enumerate(["cats", "dogs", "rain", "tea"] * 2)]
        emb = client.embeddings.create(model=MODEL, input=texts)
        with torch.no_grad():
            want = [ref.model(torch.tensor([tok(t)["input_ids"]])).last_hidden_state[0].mean(0) for t in texts]
        emb_diff = max(float((torch.tensor(d.embedding) - w).abs().max()) for d, w in zip(emb.data, want, strict=True))

        print(
            f"max |diff| vs transformers (fp32): greedy logprobs {greedy_diff:.2e}, echo logprobs {echo_diff:.2e}, "
            f"embeddings {emb_diff:.2e}"
        )

        def complete(logprobs: int | None) -> Callable[[], object]:
            return lambda: client.completions.create(
                model=MODEL,
                prompt=ids,
                max_tokens=args.tokens,
                temperature=0,
                logprobs=logprobs,
                logit_bias={str(tok.eos_token_id): -100},  # never stop early: every run makes --tokens tokens
            )

        plain = median_s(complete(None), args.repeats)
        with_lp = median_s(complete(5), args.repeats)
        score = median_s(
            lambda: client.completions.create(model=MODEL, prompt=long_ids, max_tokens=0, echo=True, logprobs=1),
            args.repeats,
        )
        embed = median_s(lambda: client.embeddings.create(model=MODEL, input=texts), args.repeats)
        print(f"completion of {args.tokens} tokens: {plain:.2f} s plain, {with_lp:.2f} s with logprobs=5")
        print(f"echo scoring of {len(long_ids)} prompt tokens (max_tokens=0): {score:.2f} s")
        print(f"embeddings of {len(texts)} texts: {embed:.2f} s")
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
