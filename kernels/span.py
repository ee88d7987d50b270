"""A contiguous span `[start, end)` of transformer blocks: what one server hosts and runs.

The span owns no cache: callers allocate a `KVCache` with `new_cache` (a server reserves its KV budget up front)
and pass it to `step`. `forward` is the cache-free path used for training (gradients w.r.t. the span's input).
`step_many` / `run_batched` run the steps of several caches as one batch (continuous batching on servers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petal.protocol.errors import PetalError

from .cache import KVCache
from .families import get_family

if TYPE_CHECKING:  # only for `from_model`'s signature: the server path never imports transformers
    from transformers import PreTrainedModel


class Span(nn.Module):
    """Blocks `[start, start + len(blocks))` of one model, run as a unit with one causal mask and positions."""

    def __init__(self, config: Any, blocks: list[nn.Module], start: int) -> None:
        """`config`: the model's config as `petal.kernels.store.open_model` reads it, or a transformers config."""
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
        """Blocks `[start, end)` of a full transformers model, for tests and tools; its parameters are shared, not
        copied. Families with their own block code get their blocks holding the model's very parameters."""
        inner: nn.Module = getattr(model, model.base_model_prefix, model)
        layers = list(inner.get_submodule("layers" if hasattr(inner, "layers") else "h").children())
        family = get_family(model.config)
        adopt = getattr(family, "adopt_layer", None)  # a family whose blocks differ in layout (Mixtral's experts)
        if adopt is not None:
            blocks = [adopt(model.config, layers[i], i) for i in range(start, end)]
        else:
            blocks = [_adopt(family.make_block, model.config, layers[i], i) for i in range(start, end)]
        return cls(model.config, blocks, start)

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

    @torch.no_grad()
    def step_many(
        self,
        hiddens: Sequence[torch.Tensor],
        caches: Sequence[KVCache],
        attention_masks: Sequence[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor]:
        """`step` of several independent calls (each with its own cache, e.g. concurrent sessions), run as one batch
        where the family allows it (`run_batched`), else one by one; `t` may differ between calls."""
        masks = list(attention_masks) if attention_masks is not None else [None] * len(hiddens)
        if not batchable(self._runner, list(self.blocks)):
            return [self.step(h, c, m) for h, c, m in zip(hiddens, caches, masks, strict=True)]
        keys = []
        for h, c, m in zip(hiddens, caches, masks, strict=True):
            self._check_hidden(h)
            if c.length + h.shape[1] > c.max_length or c.batch != h.shape[0] or c.num_layers != len(self.blocks):
                raise PetalError("wrong_shape", "a cache does not fit its call: run the calls one by one to see which")
            keys.append(self._key_mask(m, h.shape[0], c.length + h.shape[1], h.device))
        return run_batched(self._runner, list(self.blocks), hiddens, keys, caches, hiddens[0].dtype)

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


def batchable(runner: Any, blocks: Sequence[nn.Module]) -> bool:
    """Whether `run_batched` can run these blocks as one batch (families without a batched path: one by one)."""
    check = getattr(runner, "batchable", None)
    return bool(check is not None and check(blocks))


def run_batched(
    runner: Any,
    blocks: Sequence[nn.Module],
    hiddens: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    caches: Sequence[KVCache],
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Continuous batching: several calls' `hiddens[i]` `[b_i, t_i, H]` through `blocks` as ONE batch, each attending
    to its own `caches[i]` with its own key mask `masks[i]` `[b_i, caches[i].length + t_i]` (so its own positions and
    padding); the token rows of all calls go through every linear layer, norm and MLP together. Each cache advances by
    its `t_i`. The outputs equal the calls run alone (up to float rounding). Needs `batchable(runner, blocks)`."""
    from .families.decoder import Segment

    prepared = [runner.prepare(m, h.shape[1], dtype) for h, m in zip(hiddens, masks, strict=True)]
    size = hiddens[0].shape[-1]
    flat = torch.cat([h.reshape(1, -1, size) for h in hiddens], dim=1)
    for index, block in enumerate(blocks):
        segments = [
            Segment(h.shape[0], h.shape[1], p, c.layer(index))
            for h, p, c in zip(hiddens, prepared, caches, strict=True)
        ]
        flat = runner.run_block_segments(block, flat, segments)
    outs = [
        part.reshape(h.shape)
        for part, h in zip(torch.split(flat[0], [h.shape[0] * h.shape[1] for h in hiddens]), hiddens, strict=True)
    ]
    for cache, h in zip(caches, hiddens, strict=True):
        cache.advance(h.shape[1])
    return outs


def _adopt(make_block: Any, config: Any, layer: nn.Module, index: int) -> nn.Module:
    """`layer` itself when the family uses that class, else a family block built from `layer`'s own Linear modules
    and parameters (nothing copied)."""
    with torch.device("meta"):
        block: nn.Module = make_block(config, index)
    if type(block) is type(layer):
        return layer
    ours, theirs = dict(block.named_parameters()), dict(layer.named_parameters())
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        raise ValueError(
            f"block {index}: {type(layer).__name__} has parameters {sorted(theirs)}, but the family's "
            f"{type(block).__name__} expects {sorted(ours)} (with the same shapes)"
        )
    if any(True for _ in block.buffers()):
        raise ValueError(f"{type(block).__name__} has buffers; adopt them from the model too")
    their_modules = dict(layer.named_modules())
    for name, mine in list(block.named_modules()):  # leaves of the same class (the Linears) are taken over whole,
        other = their_modules.get(name)  # so hooks a caller put on the model's layers still fire
        if name and other is not None and type(other) is type(mine) and not any(True for _ in mine.children()):
            owner, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(owner), leaf, other)
    for name, param in list(block.named_parameters()):  # the rest (norms) hold the model's very parameters
        if param.is_meta:
            owner, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(owner), leaf, theirs[name])
    return block
