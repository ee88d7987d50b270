"""Compute benchmarks on the real SmolLM2-135M-Instruct: block/span speed, whole-model baseline, int8 quality.

Run: .venv/bin/python tests/benchmarks/bench_kernels.py [--repeats 20] [--threads N]
Prints markdown tables (copied into docs/benchmarks.md). Timings are median / best over `--repeats` runs after a
warm-up; the machine's load average is printed too, since other processes skew CPU timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from petal.daemon.pull import pull_model
from petal.kernels.int8 import quantize_module
from petal.kernels.store import ModelInfo, load_client_parts, load_span, open_model

CONTEXT = 128  # prompt / forward length, batch 1
HOP = 15  # the mid-model hop: spans [0, 15) and [15, 30)

# A fixed English paragraph (~300 tokens) for quality figures; never change it, or old figures stop comparing.
TEXT = (
    "Every autumn the small harbour town prepares for the storms that come in from the west. Fishermen pull "
    "their boats high onto the shingle, tie them to iron rings set into the sea wall, and cover the engines "
    "with canvas. The baker doubles his orders of flour, because when the wind is strong nobody wants to walk "
    "far, and the bakery is in the middle of the main street. At the school, the teachers check that the "
    "windows close properly and that the old radiators still work. Children are told to stay away from the "
    "pier, where waves can break over the railing without warning. Most people in the town have lived there "
    "all their lives, and they speak about the great storm of 1987 as if it happened last year: the roof of "
    "the church was torn off, the lifeboat was launched eleven times in two days, and the lighthouse keeper "
    "kept the lamp burning although the water reached the second floor of his house. Visitors sometimes ask "
    "why anyone would choose to live in such a place. The answer is usually the same. In spring the hills "
    "behind the town turn yellow with gorse, the sea becomes calm and green, and the evenings are long and "
    "quiet. The storms are the price of those evenings, and the people of the town have always been willing "
    "to pay it. When the first gale of the season finally arrives, they close their shutters, light their "
    "fires, and wait for the morning with patience, knowing that the sea will be calm again soon."
)


def timings(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """(median, best) seconds: the best run is the figure least disturbed by other processes on the machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


VARIANTS: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "none"),
    "bf16": (torch.bfloat16, "none"),
    "int8": (torch.float32, "int8"),  # int8 weights, bf16 activations inside each matmul, fp32 elsewhere
}


@torch.no_grad()
def block_and_span_speed(info: ModelInfo, prompt: torch.Tensor, repeats: int) -> list[tuple[str, str, str]]:
    """(variant, decode step ms per block, 10-block span forward tokens/s on CONTEXT tokens).

    The per-block figure is one decode step of all 30 blocks divided by 30: stepping a single block over and
    over would keep its weights in the CPU cache and flatter fp32 (13.6 MB per block) by up to 4x.
    """
    rows = []
    for name, (dtype, quant) in VARIANTS.items():
        blocks = load_span(info, 0, info.num_blocks, dtype=dtype, quant=quant)
        cache = blocks.new_cache(1, CONTEXT + repeats + 8, dtype, "cpu")
        blocks.step(prompt.to(dtype), cache)
        token = prompt[:, -1:].to(dtype)
        step = timings(lambda blocks=blocks, token=token, cache=cache: blocks.step(token, cache), repeats)
        span = load_span(info, 0, 10, dtype=dtype, quant=quant)
        fwd = timings(lambda span=span, dtype=dtype: span(prompt.to(dtype)), max(3, repeats // 4), warmup=1)
        rows.append((name, _ms(step, info.num_blocks), _tps(fwd)))
    return rows


def _whole_model(path: str, name: str) -> nn.Module:
    dtype, quant = VARIANTS[name]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if quant == "int8":
        quantize_module(model.model.layers, "cpu")  # the blocks only, as a server would; head stays fp32
    return model


@torch.no_grad()
def whole_model_speed(model: nn.Module, ids: torch.Tensor, repeats: int) -> tuple[str, str]:
    """(decode ms/token after a CONTEXT-token prompt, forward tokens/s on CONTEXT tokens), one process."""
    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    decode = timings(lambda: model(token, past_key_values=cache, use_cache=True), repeats)
    fwd = timings(lambda: model(ids), max(3, repeats // 4), warmup=1)
    return _ms(decode), _tps(fwd)


def _ms(t: tuple[float, float], per: int = 1) -> str:
    return f"{t[0] * 1000 / per:.2f} / {t[1] * 1000 / per:.2f}"


def _tps(t: tuple[float, float]) -> str:
    return f"{CONTEXT / t[0]:.0f} / {CONTEXT / t[1]:.0f}"


def _quality(logits: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement with the fp32 reference, perplexity of the text) over all next-token positions."""
    agree = (logits[0, :-1].argmax(-1) == ref[0, :-1].argmax(-1)).float().mean().item()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    return agree, float(torch.exp(nll))


@torch.no_grad()
def hop_quality(info: ModelInfo, ids: torch.Tensor, ref: torch.Tensor) -> list[tuple[str, float, float]]:
    """Top-1 agreement and perplexity when the hidden state after block HOP goes through each wire codec."""
    try:
        from petal.protocol.tensors import CODECS, decode_tensor, encode_tensor
    except ImportError:
        return []
    parts = load_client_parts(info)
    first, second = load_span(info, 0, HOP), load_span(info, HOP, info.num_blocks)
    mid = first(parts.embed(ids))
    rows = []
    for codec in [c for c in ("q8", "float16", "bfloat16") if c in CODECS]:
        hop = decode_tensor(encode_tensor(mid, codec))
        rows.append((codec, *_quality(parts.logits(second(hop)), ref, ids)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = pull_model("smollm2", progress=False)
    info = open_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_ids = tokenizer(TEXT, return_tensors="pt").input_ids
    prompt_ids = text_ids[:, :CONTEXT]
    parts = load_client_parts(info)
    prompt_hidden = parts.embed(prompt_ids)

    print(
        f"SmolLM2-135M-Instruct ({info.fingerprint}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"at start, batch 1, context {CONTEXT}, {args.repeats} repeats\n"
    )

    print(
        "| weights | decode step per block, ms (30-block step / 30), median / best "
        "| span [0,10) forward, tokens/s, median / best |"
    )
    print("|---|---:|---:|")
    for name, step_ms, tps in block_and_span_speed(info, prompt_hidden, args.repeats):
        print(f"| {name} | {step_ms} | {tps} |")

    print(
        "\n| whole model (transformers, one process) | decode ms/token, median / best "
        "| forward tokens/s, median / best "
        f"| top-1 agreement vs fp32 | perplexity ({text_ids.shape[1]} tokens) |"
    )
    print("|---|---:|---:|---:|---:|")
    ref = None
    for name in VARIANTS:
        model = _whole_model(str(path), name)
        decode_ms, tps = whole_model_speed(model, prompt_ids, args.repeats)
        with torch.no_grad():
            logits = model(text_ids).logits.float()
        ref = logits if ref is None else ref
        agree, ppl = _quality(logits, ref, text_ids)
        print(f"| {name} | {decode_ms} | {tps} | {agree:.1%} | {ppl:.3f} |")
        del model

    rows = hop_quality(info, text_ids, ref)
    if rows:
        print(
            f"\n| hidden state at the hop after block {HOP - 1} (spans [0,{HOP}) + [{HOP},30), fp32) "
            "| top-1 agreement vs fp32 | perplexity |"
        )
        print("|---|---:|---:|")
        for codec, agree, ppl in rows:
            print(f"| {codec} | {agree:.1%} | {ppl:.3f} |")
    else:
        print("\n(petal.protocol.tensors is not available: wire-codec hop quality skipped)")
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
