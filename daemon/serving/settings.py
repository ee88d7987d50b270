"""The limits one block server runs under (`ServeSettings`), the dtypes it accepts, and its KV-budget default.

Below everything else in `petal.daemon.serving`: the server, the pool, the planner and the host all read these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from petal.daemon.config import Config

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CACHE_TOKENS_PER_BLOCK = 4096
DEFAULT_MAX_BATCH_TOKENS = 1024
"""petald --max-batch-tokens: token rows (batch x tokens, summed) one continuous batch may hold (batching.py)."""


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one block server (from Config; defaults suit tests)."""

    dtype: str = "float32"
    device: str = "cpu"
    quant: str = "none"
    max_batch: int = 8
    max_length: int = 4096
    max_cache_tokens: int | None = None  # tokens x blocks; None: DEFAULT_CACHE_TOKENS_PER_BLOCK per hosted block
    codec: str = "q8"
    alloc_timeout: float = 10.0
    idle_timeout: float = 600.0  # an inference session with no step for this long is closed and its cache freed
    request_timeout: float = 300.0  # longest a forward/backward/step may queue + run
    max_queue: int = 64
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # continuous batching's token budget per batch; <= 1: off
    inline_steps: bool = True  # the only open session's small steps run on the event loop (InferenceSession._submit)
    refresh_period: float = 30.0  # how often to re-announce when the free KV budget changed noticeably
    peer_share: float = 0.5  # most of the KV budget one peer may hold while other peers use or wait for it
    contended_idle_timeout: float = 10.0  # an idle session is closed after this while another peer waits (or draining)
    public_name: str = ""  # petald --public-name, carried in the server's DHT record
    drain_timeout: float = 30.0  # on SIGTERM or unserve: longest open sessions may run on before they are closed
    # bytes of training activations kept between a forward and its backward; None: the larger of a quarter of the
    # KV budget's bytes and activations.MIN_DEFAULT_BUDGET; 0: keep none (every backward recomputes)
    activation_budget: int | None = None
    test_lie: float = 0.0  # TEST ONLY (petald --test-lie): relative noise added to every output; 0: honest


DEFAULT_SETTINGS = ServeSettings()


def settings_from_config(config: Config) -> ServeSettings:
    """The daemon's serving settings (`petald --dtype ...` or the config file); the rest keep their defaults."""
    return ServeSettings(
        dtype=config.dtype,
        device=config.device,
        quant=config.quant,
        max_batch=config.max_batch,
        max_length=config.max_length,
        max_batch_tokens=config.max_batch_tokens,
        inline_steps=config.inline_steps,
        max_cache_tokens=config.max_cache_tokens,
        codec=config.codec,
        alloc_timeout=config.alloc_timeout,
        activation_budget=None if config.activation_budget_mb is None else config.activation_budget_mb * 2**20,
        test_lie=config.test_lie,
        public_name=config.public_name or "",
    )
