"""What to serve, decided before any weight is read (`ServePlan`, `plan_serving`), and loading a plan's span.

A bad request (unknown model, blocks outside the model, CUDA asked for but absent) fails here, fast and cheaply,
with a `ServeError` that says what to change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.hub import blocks_missing, read_source
from petal.daemon.pull import PullError, default_models_dir, pull_gguf
from petal.daemon.serving.errors import ServeError
from petal.daemon.serving.placement import Entries, choose_span, parse_blocks
from petal.daemon.serving.settings import DTYPES, ServeSettings
from petal.protocol.records import block_key

if TYPE_CHECKING:
    from petal.kernels.span import Span
    from petal.kernels.store import ModelInfo

log = logging.getLogger("petal.server")

Progress = Callable[[dict[str, Any]], None]
"""Receives serving progress events (``{"event": "loading", ...}``); may be called from a loader thread."""


@dataclass(frozen=True)
class ServePlan:
    """What `Host.serve` will load: resolved before any weight is read, so a bad request fails fast and cheaply."""

    info: ModelInfo
    start: int
    end: int
    settings: ServeSettings
    rebalance: bool  # span chosen by the swarm's needs (--num-blocks): a Rebalancer may move it later


def resolve_model_dir(serve: str) -> Path:
    """`serve` is a model dir path, the name of a model pulled into the models dir, or a .gguf file's path.

    A GGUF file is converted into the models dir on first use (seconds to minutes: call this off the event loop).
    """
    path = Path(serve).expanduser()
    if serve.lower().endswith(".gguf") and path.is_file():
        try:
            return pull_gguf(str(path), default_models_dir(), progress=False)
        except PullError as e:
            raise ServeError(f"--serve {serve}: {e}") from None
    if (path / "config.json").is_file():
        return path
    candidate = default_models_dir() / serve
    if (candidate / "config.json").is_file():
        return candidate
    raise ServeError(
        f"--serve {serve!r} is neither a model dir nor a model in {default_models_dir()}; "
        f"pull it first with `petald pull {serve}` or pass the model dir's path"
    )


async def swarm_entries(dht: SwarmDHT, model: str, total: int) -> Entries:
    """The DHT entries under each of the model's block keys (a block whose lookup failed is left out)."""
    results = await asyncio.gather(*(dht.get(block_key(model, b)) for b in range(total)), return_exceptions=True)
    return {b: r for b, r in enumerate(results) if not isinstance(r, BaseException)}


async def plan_serving(
    dht: SwarmDHT, settings: ServeSettings, serve: str, *, blocks: str | None = None, num_blocks: int | None = None
) -> ServePlan:
    """Resolve the model and choose the span (`blocks` "A:B", else `num_blocks` where the swarm is weakest, else all).

    Raises ServeError with a message that says what to change.
    """
    from petal.kernels.store import ModelStoreError, open_model  # lazily: transformers is slow to import

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ServeError("--device cuda but torch sees no CUDA device; use --device cpu or fix the CUDA setup")
    try:
        info = await asyncio.to_thread(lambda: open_model(resolve_model_dir(serve)))
    except ModelStoreError as e:
        raise ServeError(str(e)) from None
    total = info.num_blocks
    if blocks:
        start, end = parse_blocks(blocks, total)
    elif num_blocks:
        entries = await swarm_entries(dht, info.name, total)
        start, end = choose_span(entries, num_blocks, total)
        log.info("chose blocks [%d, %d) of %s where the swarm is weakest", start, end, info.name)
    else:
        start, end = _pulled_span(info.path) or (0, total)
    if missing := blocks_missing(info.path, start, end):
        held = read_source(info.path) or {}
        raise ServeError(
            f"{info.path} is a partial pull holding blocks {held.get('blocks')}, not {missing[0]}..{missing[-1]} of "
            f"[{start}, {end}); pull them first: petald pull {held.get('repo', info.name)} --blocks {start}:{end}"
        )
    return ServePlan(info, start, end, settings, rebalance=bool(num_blocks and not blocks))


def _pulled_span(model_dir: Path) -> tuple[int, int] | None:
    """The one span a partial Hub pull holds (what to serve when no blocks are asked for); None otherwise."""
    held = (read_source(model_dir) or {}).get("blocks")
    if isinstance(held, list) and len(held) == 1:
        return int(held[0][0]), int(held[0][1])
    return None


def load_span(info: ModelInfo, start: int, end: int, settings: ServeSettings, progress: Progress | None) -> Span:
    """`petal.kernels.store.load_span`, one block at a time when someone watches the progress (same result: blocks
    are independent). Blocking: run it in a thread."""
    from petal.kernels import store  # lazily: transformers is slow to import
    from petal.kernels.span import Span

    dtype, device, quant = DTYPES[settings.dtype], settings.device, settings.quant
    if progress is None:
        return store.load_span(info, start, end, dtype=dtype, device=device, quant=quant)
    blocks: list[nn.Module] = []
    for index in range(start, end):
        blocks.extend(store.load_span(info, index, index + 1, dtype=dtype, device=device, quant=quant).blocks)
        progress(
            {
                "event": "loading",
                "model": info.name,
                "start": start,
                "end": end,
                "block": index,
                "loaded": index + 1 - start,
                "total": end - start,
            }
        )
    return Span(info.config, blocks, start)
