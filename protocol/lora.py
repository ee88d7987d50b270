"""Client-owned LoRA weights on the wire: they travel with each forward/backward, servers never keep them.

Wire form (a field ``lora`` of a forward or backward request)::

    {"scale": alpha / r,
     "weights": {"<abs block>.<module path>.lora_A": tensor [r, in_features],
                 "<abs block>.<module path>.lora_B": tensor [out_features, r], ...}}

``<module path>`` is the ``nn.Linear``'s path inside a block as transformers names it (``self_attn.q_proj``,
``self_attention.query_key_value``). Semantics are PEFT's LoRA without dropout:
``y = linear(x) + scale * (x @ A.T) @ B.T``. A backward reply carries ``grad_lora`` with the same keys.

Parsing never trusts the sender: key syntax, A/B pairing, ranks, dtypes, finiteness and the total size (checked
against declared shapes before anything is allocated) are validated here; whether a module path and its shapes
fit the model is checked by the server against its layers (``petal.kernels.lora``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import torch

from petal.protocol.errors import PetalError, WireError
from petal.protocol.tensors import DTYPES, FLOAT_DTYPES, decode_tensor, encode_tensor

KEY_RE: Final = re.compile(r"^(\d+)\.([A-Za-z0-9_.]+)\.lora_(A|B)$")
MAX_KEY_CHARS: Final = 256
MAX_KEYS: Final = 8192
MAX_RANK: Final = 4096
_FLOAT_TORCH: Final = frozenset(DTYPES[d] for d in FLOAT_DTYPES)


def split_key(key: str) -> tuple[int, str, str]:
    """``"3.self_attn.q_proj.lora_A"`` -> ``(3, "self_attn.q_proj", "A")``; raises WireError on a bad key."""
    match = KEY_RE.fullmatch(key) if isinstance(key, str) and len(key) <= MAX_KEY_CHARS else None
    if match is None or ".." in match.group(2) or match.group(2).startswith(".") or match.group(2).endswith("."):
        raise WireError(
            "bad_frame",
            f"lora key {key!r:.100} must look like '<block>.<module path>.lora_A' or '.lora_B', "
            "e.g. '3.self_attn.q_proj.lora_A'",
        )
    return int(match.group(1)), match.group(2), match.group(3)


def lora_key(block: int, path: str, which: str) -> str:
    """The wire key of ``which`` ("A" or "B") for module ``path`` of absolute block ``block``."""
    return f"{block}.{path}.lora_{which}"


def _check_pairs(weights: Mapping[str, torch.Tensor]) -> None:
    """Key syntax, complete A/B pairs, 2-D float tensors, equal rank within each pair."""
    seen: dict[tuple[int, str], set[str]] = {}
    for key, t in weights.items():
        block, path, which = split_key(key)
        if not isinstance(t, torch.Tensor):
            raise WireError("bad_tensor", f"lora {key!r}: expected a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_TORCH:
            raise WireError("bad_tensor", f"lora {key!r} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 2 or 0 in t.shape:
            raise PetalError("wrong_shape", f"lora {key!r} must be a non-empty 2-D tensor, got shape {list(t.shape)}")
        seen.setdefault((block, path), set()).add(which)
    for (block, path), kinds in seen.items():
        if kinds != {"A", "B"}:
            missing = lora_key(block, path, "B" if "A" in kinds else "A")
            raise PetalError(
                "bad_request", f"lora {missing!r} is missing: every lora_A needs its lora_B and vice versa"
            )
        a, b = weights[lora_key(block, path, "A")], weights[lora_key(block, path, "B")]
        if a.shape[0] != b.shape[1]:
            raise PetalError(
                "wrong_shape",
                f"lora {block}.{path}: lora_A is {list(a.shape)} = [r, in] and lora_B is {list(b.shape)} = [out, r]; "
                "their ranks r must be equal",
            )
        if a.shape[0] > MAX_RANK:
            raise PetalError("bad_request", f"lora {block}.{path}: rank {a.shape[0]} exceeds the limit {MAX_RANK}")


@dataclass(frozen=True)
class Lora:
    """LoRA weights for some blocks and modules, with one ``scale`` (alpha / r) for all of them.

    Construction checks the structure (keys, pairs, ranks); tensors may require grad (the client trains them).
    """

    scale: float
    weights: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise PetalError("bad_request", f"lora scale must be a finite number (alpha / r), got {self.scale!r:.40}")
        if not self.weights:
            raise PetalError("bad_request", "lora has no weights; leave 'lora' out instead of sending an empty one")
        _check_pairs(self.weights)

    @property
    def blocks(self) -> list[int]:
        """The absolute block indices that have LoRA weights, sorted."""
        return sorted({split_key(k)[0] for k in self.weights})

    def modules(self, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (A, B) for one absolute block (empty if it has none)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in self.weights:
            b, path, which = split_key(key)
            if b == block and which == "A":
                out[path] = (self.weights[key], self.weights[lora_key(b, path, "B")])
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def for_blocks(self, start: int, end: int) -> Lora | None:
        """The subset for blocks ``[start, end)``, or None when none of them has weights."""
        subset = {k: t for k, t in self.weights.items() if start <= split_key(k)[0] < end}
        return Lora(self.scale, subset) if subset else None


def encode_lora(lora: Lora, codec: str = "none") -> dict[str, Any]:
    """The wire form of ``lora`` (tensors detached; ``codec`` as for any tensor, "none" keeps them exact)."""
    return {
        "scale": float(lora.scale),
        "weights": {k: encode_tensor(t.detach(), codec) for k, t in lora.weights.items()},
    }


def _decode_map(obj: object, what: str, max_bytes: int) -> dict[str, torch.Tensor]:
    """A map of key -> tensor with the total declared size bounded by ``max_bytes`` before allocation."""
    if not isinstance(obj, dict):
        raise WireError(
            "bad_frame", f"{what} must be a map of '<block>.<module>.lora_A/B' -> tensor, got {type(obj).__name__}"
        )
    if len(obj) > MAX_KEYS:
        raise WireError("too_large", f"{what} has {len(obj)} tensors; at most {MAX_KEYS} are allowed")
    budget = max_bytes
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        split_key(key)
        try:
            t = decode_tensor(value, max_bytes=budget)
        except WireError as e:
            if e.code == "too_large":
                raise WireError(
                    "too_large",
                    f"{what} exceeds the limit of {max_bytes} bytes in all (at {key!r}); "
                    "send fewer blocks or a lower rank per request",
                ) from None
            raise WireError(e.code, f"{what} {key!r}: {e.message}") from None
        budget -= t.numel() * t.element_size()
        if t.dtype not in _FLOAT_TORCH:
            raise WireError("bad_tensor", f"{what} {key!r} must be float32, float16 or bfloat16, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise WireError("bad_tensor", f"{what} {key!r} contains NaN or infinite values")
        out[key] = t
    return out


def parse_lora(obj: object, *, max_bytes: int) -> Lora:
    """Validate a wire ``lora`` field; the weights' total size is bounded by ``max_bytes``.

    Raises WireError (malformed: structure, key syntax, tensor encoding, NaN/inf, size) or PetalError
    ("bad_request" for an unpaired A/B or a bad scale, "wrong_shape" for ranks that differ within a pair).
    """
    if not isinstance(obj, dict) or set(obj) != {"scale", "weights"}:
        keys = sorted(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise WireError("bad_frame", f"lora must be a map with keys 'scale' and 'weights', got {keys}")
    scale = obj["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise PetalError("bad_request", f"lora scale must be a finite number (alpha / r), got {scale!r:.40}")
    return Lora(float(scale), _decode_map(obj["weights"], "lora", max_bytes))


def encode_lora_grads(grads: Mapping[str, torch.Tensor], codec: str = "none") -> dict[str, Any]:
    """The wire form of a backward reply's ``grad_lora`` (same keys as the request's lora)."""
    return {k: encode_tensor(t.detach(), codec) for k, t in grads.items()}


def decode_lora_grads(obj: object, lora: Lora, *, max_bytes: int) -> dict[str, torch.Tensor]:
    """A reply's ``grad_lora``: exactly ``lora``'s keys, each with its weight's shape, cast to its dtype.

    Raises WireError("bad_tensor"/"bad_frame") for anything else: a server must not return other gradients.
    """
    if obj is None:
        raise WireError("bad_frame", "the server sent no grad_lora although lora weights were sent; it may be outdated")
    grads = _decode_map(obj, "grad_lora", max_bytes)
    if set(grads) != set(lora.weights):
        missing, extra = sorted(set(lora.weights) - set(grads)), sorted(set(grads) - set(lora.weights))
        raise WireError(
            "bad_frame", f"grad_lora keys differ from the lora sent: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out = {}
    for key, g in grads.items():
        w = lora.weights[key]
        if g.shape != w.shape:
            raise WireError("bad_tensor", f"grad_lora {key!r} has shape {list(g.shape)}, expected {list(w.shape)}")
        out[key] = g.to(w.dtype)
    return out


__all__ = [
    "KEY_RE",
    "Lora",
    "decode_lora_grads",
    "encode_lora",
    "encode_lora_grads",
    "lora_key",
    "parse_lora",
    "split_key",
]
