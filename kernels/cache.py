"""A preallocated key/value cache for one span of blocks.

A server reserves its whole KV budget up front (no out-of-memory after hours of serving), so the cache is a
plain object: one key and one value tensor per layer, each `[batch, kv_heads, max_length, head_dim]`, and a
`length` counter. Steps write into the buffers in place; nothing ever grows by concatenation, which also lets a
later pool hand out caches carved from one big allocation (build a `KVCache` from those tensors directly).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers of fixed `max_length` plus the number of positions filled so far."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0) -> None:
        if not keys or len(keys) != len(values):
            raise ValueError(f"KVCache needs one key and one value buffer per layer, got {len(keys)} and {len(values)}")
        shape = keys[0].shape
        for k, v in zip(keys, values, strict=True):
            if k.dim() != 4 or k.shape != shape or v.shape != shape:
                raise ValueError(
                    f"every KV buffer must be [batch, heads, max_length, head_dim] of shape {tuple(shape)}"
                )
        self.keys = keys
        self.values = values
        if not 0 <= length <= shape[2]:
            raise ValueError(f"cache length {length} is outside [0, max_length={shape[2]}]")
        self.length = length

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        """Reserve zeroed buffers for `num_layers` layers up front."""
        shape = (batch, kv_heads, max_length, head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(keys, values)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def nbytes(self) -> int:
        """Bytes reserved by all buffers (what a server charges against its KV budget)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (e.g. to replay history from a known point)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reorder(self, rows: torch.Tensor | list[int] | tuple[int, ...]) -> None:
        """Row ``i`` becomes what row ``rows[i]`` held, for every filled position (beam search: a gather, so rows may
        repeat). In place, in the preallocated buffers; positions past ``length`` are left alone."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        if index.dim() != 1 or index.shape[0] != self.batch or bool(((index < 0) | (index >= self.batch)).any()):
            raise ValueError(f"reorder needs {self.batch} row indices in [0, {self.batch}), got {list(rows)[:16]}")
        n = self.length
        for buffers in (self.keys, self.values):
            for t in buffers:
                t[:, :, :n] = t[:, :, :n].index_select(0, index)

    def reset(self) -> None:
        """Forget everything; the buffers stay reserved."""
        self.length = 0

    def layer(self, index: int) -> LayerSlot:
        """The view that layer `index` of the span writes its new keys and values through."""
        return LayerSlot(self, index)

    def advance(self, t: int) -> None:
        """Mark `t` more positions as filled, after every layer has written them."""
        if self.length + t > self.max_length:
            raise ValueError(f"cache overflow: {self.length} + {t} > max_length {self.max_length}")
        self.length += t


class LayerSlot:
    """Duck-types the one method transformers' attention layers call on a cache: `update(key, value, layer_idx)`.

    It writes the new positions at `cache.length` into the preallocated buffers and returns views of everything
    filled so far; `layer_idx` is ignored because each block gets its own slot (blocks keep their absolute index).
    """

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int | None = None, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.cache.length
        end = start + key.shape[2]
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        return keys[:, :, :end], values[:, :, :end]
