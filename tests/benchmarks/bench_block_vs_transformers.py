"""Petal's own decoder block vs transformers' `LlamaDecoderLayer` on SmolLM2's 30 blocks, interleaved in one process.

Same weights, same thread, same KV cache layout: decode steps alternate between the two (A, B, A, B, ...) after a
128-token prefill, so load from other processes hits both alike; then a 128-token forward each. Prints the median,
25th percentile and best ms per block, forward tokens/s, and the max |diff| of the outputs.

    .venv/bin/python tests/benchmarks/bench_block_vs_transformers.py [--dtype fp32|bf16] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from petal.daemon.pull import pull_model
from petal.kernels.cache import KVCache
from petal.kernels.families import base
from petal.kernels.store import load_span, open_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class TransformersSpan(nn.Module):
    """transformers' layers fed the way petal fed them before it had its own block (sdpa, our mask and cache)."""

    def __init__(self, path: str, state: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        config = copy.deepcopy(AutoConfig.from_pretrained(path))
        config._attn_implementation = "sdpa"
        layers = []
        for i, sd in enumerate(state):
            with torch.device("meta"):
                layer = LlamaDecoderLayer(config, layer_idx=i)
            layer.load_state_dict(sd, assign=True)
            layers.append(layer)
        self.layers = nn.ModuleList(layers).eval()
        self.rotary = LlamaRotaryEmbedding(config)

    def run(self, hidden: torch.Tensor, mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        t = hidden.shape[1]
        positions = base.position_ids(mask)[:, -t:]
        kwargs = {
            "attention_mask": base.causal_mask(mask, t, hidden.dtype),
            "position_ids": positions,
            "position_embeddings": self.rotary(torch.empty(0, dtype=hidden.dtype), positions),
        }
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else cache.layer(i)
            hidden = layer(hidden, past_key_values=kv, use_cache=kv is not None, **kwargs)
        if cache is not None:
            cache.advance(t)
        return hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype, n = DTYPES[args.dtype], args.steps
    path = str(pull_model("smollm2", progress=False))
    ours = load_span(open_model(path), 0, 30, dtype=dtype)
    theirs = TransformersSpan(path, [b.state_dict() for b in ours.blocks])
    prompt = torch.randn(1, 128, ours.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    token = prompt[:, -1:]
    with torch.no_grad():
        c_ours, c_theirs = (ours.new_cache(1, 128 + n + 8, dtype, "cpu") for _ in range(2))
        ours.step(prompt, c_ours)
        theirs.run(prompt, torch.ones(1, 128, dtype=torch.long), c_theirs)

        def step_theirs() -> torch.Tensor:
            return theirs.run(token, torch.ones(1, c_theirs.length + 1, dtype=torch.long), c_theirs)

        runs = {
            "transformers' LlamaDecoderLayer": step_theirs,
            "petal's decoder block": lambda: ours.step(token, c_ours),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for i in range(n + 3):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - t)
        diff = (ours.step(token, c_ours).float() - step_theirs().float()).abs().max().item()
        mask = torch.ones(1, 128, dtype=torch.long)
        forwards = {
            "transformers' LlamaDecoderLayer": lambda: theirs.run(prompt, mask, None),
            "petal's decoder block": lambda: ours(prompt),
        }
        fwd: dict[str, list[float]] = {name: [] for name in forwards}
        for _ in range(6):
            for name, fn in forwards.items():
                t = time.perf_counter()
                fn()
                fwd[name].append(time.perf_counter() - t)
    print(f"SmolLM2 30 blocks, {args.dtype}, 1 thread, {n} decode steps each (interleaved), max |diff| {diff:.3g}")
    print("| block | decode ms/block median / p25 / best | 30-block forward 128 tokens, tok/s (median) |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        ts = sorted(ts)
        ms = [x * 1000 / 30 for x in (statistics.median(ts), ts[len(ts) // 4], ts[0])]
        print(f"| {name} | {ms[0]:.2f} / {ms[1]:.2f} / {ms[2]:.2f} | {128 / statistics.median(fwd[name]):.0f} |")


if __name__ == "__main__":
    main()
