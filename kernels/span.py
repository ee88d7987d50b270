"""A contiguous span `[start, end)` of transformer blocks: what one server hosts and runs.

The span owns no cache: callers allocate a `KVCache` with `new_cache` (a server reserves its KV budget up front)
and pass it to `step`. `forward` is the cache-free path used for training (gradients w.r.t. the span's input).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from petal.protocol.errors import PetalError

from .cache import KVCache
from .families import get_family


class Span(nn.Module):
    """Blocks `[start, start + len(blocks))` of one model, run as a unit with one causal mask and positions."""

    def __init__(self, config: PretrainedConfig, blocks: list[nn.Module], start: int) -> None:
        super().__init__()
        if not blocks:
            raise ValueError("a span needs at least one block")
        if start < 0 or start + len(blocks) > config.num_hidden_layers:
            raise ValueError(
                f"span [{start}, {start + len(blocks)}) is outside the model's {config.num_hidden_layers} layers"
            )
        self.config = config
        self.family = get_family(config)
        self.blocks = nn.ModuleList(blocks)
        self._start = start
        self._runner = self.family.BlockRunner(config)
        self.eval()

    @classmethod
    def from_model(cls, model: PreTrainedModel, start: int, end: int) -> Span:
        """Take blocks `[start, end)` out of a full transformers model (shared, not copied); for tests and tools."""
        inner: nn.Module = getattr(model, model.base_model_prefix, model)
        layers = inner.get_submodule("layers" if hasattr(inner, "layers") else "h")
        return cls(model.config, list(layers.children())[start:end], start)

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._start + len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[1] == 0 or hidden.shape[-1] != self.hidden_size:
            raise PetalError(
                "wrong_shape",
                f"hidden states must be [batch, tokens >= 1, {self.hidden_size}], got {tuple(hidden.shape)}",
            )

    @staticmethod
    def _key_mask(attention_mask: torch.Tensor | None, batch: int, total: int, device: torch.device) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, total, dtype=torch.long, device=device)
        if tuple(attention_mask.shape) != (batch, total):
            raise PetalError(
                "wrong_shape",
                f"attention_mask must be [batch, past + new tokens] = [{batch}, {total}], "
                f"got {tuple(attention_mask.shape)}",
            )
        return attention_mask.to(device)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal forward over the whole sequence without a cache; differentiable w.r.t. `hidden`.

        `attention_mask` is `[B, T]` with 1 for real tokens and 0 for (left) padding.
        """
        self._check_hidden(hidden)
        batch, t, _ = hidden.shape
        mask = self._key_mask(attention_mask, batch, t, hidden.device)
        prepared = self._runner.prepare(mask, t, hidden.dtype)
        for block in self.blocks:
            hidden = self._runner.run_block(block, hidden, prepared, None)
        return hidden

    def new_cache(self, batch: int, max_length: int, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """A cache for this span with room for `max_length` positions, allocated now."""
        kv_heads, head_dim = self.family.kv_shape(self.config)
        return KVCache.allocate(len(self.blocks), batch, kv_heads, max_length, head_dim, dtype, device)

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run `t` new tokens (prefill t > 1, or decode t = 1), attending to and extending `cache`.

        Positions continue from `cache.length`. `attention_mask` is `[B, cache.length + t]` covering the past and
        the new tokens (1 = real, 0 = left padding); None means no padding.
        """
        self._check_hidden(hidden)
        batch, t, _ = hidden.shape
        if cache.num_layers != len(self.blocks) or cache.batch != batch:
            raise PetalError(
                "wrong_shape",
                f"cache has {cache.num_layers} layers x batch {cache.batch}, but this span has "
                f"{len(self.blocks)} blocks and the input batch is {batch}; allocate it with span.new_cache",
            )
        if cache.dtype != hidden.dtype:
            raise PetalError(
                "wrong_shape", f"cache dtype {cache.dtype} differs from hidden states dtype {hidden.dtype}"
            )
        total = cache.length + t
        if total > cache.max_length:
            raise PetalError(
                "max_length",
                f"{cache.length} cached + {t} new tokens exceed max_length {cache.max_length}; "
                "open a new session with a larger max_length",
            )
        mask = self._key_mask(attention_mask, batch, total, hidden.device)
        prepared = self._runner.prepare(mask, t, hidden.dtype)
        for index, block in enumerate(self.blocks):
            hidden = self._runner.run_block(block, hidden, prepared, cache.layer(index))
        cache.advance(t)
        return hidden
