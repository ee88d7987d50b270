"""`python -m petal.daemon.demo`: chat with SmolLM2 through three chained spans, streaming tokens.

A stand-in until the swarm serves blocks: the same pieces a client and three servers would use (client
parts, spans [0,10) [10,20) [20,30) with their own KV caches), wired together in one process.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import click
import torch
from torch import nn

from petal.kernels.span import Span

__all__ = ["greedy_tokens", "main"]


@torch.no_grad()
def greedy_tokens(
    parts: nn.Module,
    spans: Sequence[Span],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
) -> Iterator[int]:
    """Yield greedy tokens for one prompt `[1, T]` through chained spans, each keeping its own KV cache.

    Stops after `max_new_tokens` or right after yielding an end-of-sequence token, as `generate` does.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, tokens], got {tuple(input_ids.shape)}")
    max_length = input_ids.shape[1] + max_new_tokens
    caches = [span.new_cache(1, max_length, dtype, input_ids.device) for span in spans]
    tokens = input_ids
    for _ in range(max_new_tokens):
        hidden = parts.embed(tokens).to(dtype)
        for span, cache in zip(spans, caches):
            hidden = span.step(hidden, cache)
        token = int(parts.logits(hidden[:, -1:].to(torch.float32)).argmax(-1))
        yield token
        if token in eos_token_ids:
            return
        tokens = torch.tensor([[token]], device=input_ids.device)


def _cuts(num_blocks: int, pieces: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / pieces) for i in range(pieces + 1)]
    return list(zip(bounds, bounds[1:]))


@click.command()
@click.option("--prompt", default="What is the capital of France? Answer in one sentence.", show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--spans", "pieces", default=3, show_default=True, help="How many chained spans to split blocks into.")
@click.option("--quant", type=click.Choice(["none", "int8"]), default="none", show_default=True)
def main(prompt: str, max_new_tokens: int, pieces: int, quant: str) -> None:
    """Pull SmolLM2 (once) and answer PROMPT greedily through chained spans, streaming to stdout."""
    from transformers import AutoTokenizer

    from petal.daemon.pull import pull_model
    from petal.kernels.store import load_client_parts, load_span, open_model

    info = open_model(pull_model("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    parts = load_client_parts(info)
    cuts = _cuts(info.num_blocks, pieces)
    spans = [load_span(info, a, b, quant=quant) for a, b in cuts]
    click.echo(f"# {info.name} ({info.fingerprint}), spans {cuts}, quant={quant}", err=True)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    generated: list[int] = []
    shown = ""
    for token in greedy_tokens(parts, spans, ids, max_new_tokens, eos):
        if token in eos:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])  # decode the whole answer so multi-token characters come out right
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
