"""What every model family module provides, and the mask/position helpers they share.

A family (bloom.py's module-level names, or the `FAMILY` object of llama.py, mistral.py, qwen2.py, qwen3.py: a
`decoder.DecoderFamily`) provides these names, so adding a family is one new module plus one registry line in
`__init__.py`:

- `make_block(config, index) -> nn.Module`: one transformer block for absolute layer `index`, built on the
  current default device (the model store calls it under `torch.device("meta")`).
- `block_prefix(index) -> str`: that block's parameter prefix in the Hugging Face checkpoint.
- `CLIENT_PREFIXES`: `ClientParts` state-dict prefix -> checkpoint prefix (embeddings, final norm, head).
- `ClientParts(config)`: the client-side modules, a `ClientPartsBase` with `embed(input_ids)` and `logits(hidden)`.
- `client_param_names(config) -> dict[str, str]`: `ClientParts` parameter name -> checkpoint tensor name.
- `kv_shape(config) -> (kv_heads, head_dim)`: what the KV cache stores per layer.
- `BlockRunner(config)`: how to call that family's blocks with a causal mask, positions and a cache slot.
- `read_config(fields) -> config`: config.json's fields as the object every function above takes (the Llama-like
  families read it into `decoder.DecoderConfig` without importing transformers). The functions above also accept a
  transformers config of the family, for in-memory models in tests and tools.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ..cache import LayerSlot


class BlockRunner(Protocol):
    """Calls one family's blocks; built once per span, holds only derived state (e.g. rotary frequencies)."""

    def __init__(self, config: object) -> None: ...

    def prepare(self, attention_mask: torch.Tensor, t: int, dtype: torch.dtype) -> object:
        """Everything the blocks need for `t` new tokens given the full `[B, past + t]` key mask."""
        ...

    def run_block(self, block: nn.Module, hidden: torch.Tensor, prepared: object, kv: LayerSlot | None) -> torch.Tensor:
        """One block's output for `hidden` `[B, t, H]`; `kv` is None for a plain (cache-free) forward."""
        ...


class ClientPartsBase(nn.Module):
    """What every family's `ClientParts` provides: the embeddings, final norm and head that stay with the client."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[B, T, H]` for token ids `[B, T]`."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head: `[B, T, H]` hidden states -> `[B, T, vocab]` logits."""
        raise NotImplementedError


class FamilyModule(Protocol):
    """The static interface of a family module (see the module docstring)."""

    CLIENT_PREFIXES: dict[str, str]
    ClientParts: type[ClientPartsBase]
    BlockRunner: type[BlockRunner]

    def read_config(self, fields: Mapping[str, Any]) -> Any: ...

    def make_block(self, config: object, index: int) -> nn.Module: ...

    def block_prefix(self, index: int) -> str: ...

    def client_param_names(self, config: object) -> dict[str, str]: ...

    def kv_shape(self, config: object) -> tuple[int, int]: ...


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' `generate` computes them: left padding does not shift the real tokens.

    position = cumsum(mask) - 1, and 0 on padded slots.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def causal_mask(attention_mask: torch.Tensor, t: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Additive 4-D mask `[B, 1, t, L]` for the last `t` of `L` positions: causal and hiding padded keys.

    With `window`, a query also sees only the `window - 1` slots before its own (sliding-window attention, counted in
    cache slots as transformers does, so left padding takes room in the window too).

    Always built explicitly: transformers' eager attention is not causal without a mask, and sdpa's own causal
    flag aligns to the wrong corner once a cache is involved. Uses finfo.min rather than -inf so that fully
    masked (padding) query rows stay finite instead of turning into NaN.
    """
    batch, total = attention_mask.shape
    device = attention_mask.device
    query_pos = torch.arange(total - t, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    allowed = visible[None, :, :] & attention_mask.bool()[:, None, :]
    mask = torch.zeros(batch, 1, t, total, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def names_by_prefix(parts: nn.Module, prefixes: dict[str, str]) -> dict[str, str]:
    """Map every state-dict key of `parts` to its checkpoint name by swapping its prefix."""
    names = {}
    for key in parts.state_dict():
        matches = [p for p in prefixes if key.startswith(p)]
        if len(matches) != 1:
            raise ValueError(f"client parameter {key!r} matches {len(matches)} prefixes of {sorted(prefixes)}")
        names[key] = prefixes[matches[0]] + key[len(matches[0]) :]
    return names
