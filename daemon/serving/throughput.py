"""A server's own throughput: measured once per hardware + model + span + dtype + quant, cached in the state dir.

The number goes into every announcement; routers weight their choice by it and `placement` sums it per block.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from petal.daemon.serving.block_server import BlockServer
from petal.daemon.serving.compute import SpanCompute

log = logging.getLogger("petal.server")


def hardware_id(device: str) -> str:
    """What the throughput cache is keyed on besides the model: the machine's compute device."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    cpu = f"{platform.machine()}:{platform.processor() or 'unknown'}:{os.cpu_count()}"
    return f"cpu:{cpu}:threads{torch.get_num_threads()}"


def measure_throughput(compute: SpanCompute, tokens: int = 64, budget_s: float = 1.0) -> float:
    """Forward tokens/s of the whole span: a warm-up pass, then passes of `tokens` tokens for about `budget_s`."""
    hidden = torch.randn(1, tokens, compute.span.hidden_size, dtype=compute.dtype, device=compute.device)
    blocks = list(compute.span.blocks)
    with torch.no_grad():
        compute.run(blocks, hidden, None, None, None, 0)
        runs, t0 = 0, time.perf_counter()
        while runs < 2 or (time.perf_counter() - t0 < budget_s and runs < 50):
            compute.run(blocks, hidden, None, None, None, 0)
            runs += 1
        if compute.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return tokens * runs / elapsed


def _cache_key(server: BlockServer) -> str:
    return "|".join(
        [
            hardware_id(server.settings.device),
            server.fingerprint,
            f"{server.span.start}:{server.span.end}",
            server.settings.dtype,
            server.settings.quant,
        ]
    )


def _read_cache(path: Path) -> dict[str, object]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def read_cached_throughput(server: BlockServer, state_dir: Path) -> float | None:
    """The figure `cached_throughput` measured before for this hardware + model + span + dtype + quant, or None."""
    value = _read_cache(state_dir / "throughput.json").get(_cache_key(server))
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def cached_throughput(server: BlockServer, state_dir: Path) -> float:
    """Measure once per hardware + model + span + dtype + quant; later starts read `throughput.json`."""
    path = state_dir / "throughput.json"
    key = _cache_key(server)
    cache = _read_cache(path)
    value = cache.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    measured = measure_throughput(server.compute)
    cache[key] = measured
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the measured throughput in %s: %s", path, e)
    return measured
