"""Dynamic blockwise 8-bit quantization, bit-compatible with bitsandbytes' ``quantize_blockwise``.

Why this codec: hidden states have a few huge outlier channels (~24,000 in SmolLM2) next to values
near 1. Small blocks (64) keep an outlier from flattening its neighbours, and the *dynamic* code
(a sign, a decimal exponent and a shrinking fraction) keeps relative precision for small values,
where a linear int8 grid would round them to zero. See the paper's §3.1 and the benchmark table in
docs/benchmarks.md.

The format is bitsandbytes': per block of ``block`` consecutive elements (flattened, row-major), a
float32 ``absmax``, and per element a uint8 index into the 256-entry signed dynamic code; the value
is ``code[index] * absmax``. A CUDA tensor goes through bitsandbytes' kernels when bitsandbytes can be
imported; everything else runs in pure torch here, with identical decoding.

Behaviour at the edges, explicitly:
- an all-zero block has absmax 0 and every index points at the code's exact 0.0 (no NaN);
- NaN or ±inf input is rejected with ``WireError("bad_tensor")``: one inf would zero its whole block;
- the encoder picks the *nearest* code (ties to the lower index). bitsandbytes' CPU kernel uses an
  approximate search and picks the other neighbour for ~0.1 % of elements; see
  tests/unit/protocol/test_protocol_quant.py.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Final, NamedTuple

import torch

from .errors import WireError

if sys.byteorder != "little":  # the tables and the wire format read float bits in little-endian order
    raise ImportError("petal's wire codecs support little-endian hosts only (x86-64, ARM64)")

DEFAULT_BLOCK: Final[int] = 64
MAX_BLOCK: Final[int] = 1 << 20
ZERO_INDEX: Final[int] = 127
"""Index of the exact 0.0 in the dynamic code; all-zero blocks use it."""

_BNB_BLOCKS: Final[frozenset[int]] = frozenset({64, 128, 256, 512, 1024, 2048, 4096})


def _build_dynamic_code() -> torch.Tensor:
    """The signed dynamic map: for exponent e in 0..6, 2**e fraction values at scale 10**(e-6), ±, plus 0 and 1.

    Fraction values are the midpoints of ``2**e`` equal steps of [0.1, 1], computed in float32 exactly
    as bitsandbytes does, so the table is bit-for-bit the same.
    """
    parts = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        positive = (edges[1:] + edges[:-1]) / 2.0 * (10.0 ** (e - 6))
        parts += [positive, -positive]
    return torch.sort(torch.cat(parts)).values


class _Tables(NamedTuple):
    code: torch.Tensor  # float32[256], sorted
    midpoints: torch.Tensor  # float32[255], between neighbouring codes
    bin_index: torch.Tensor  # uint8[65536]: nearest-code index at the low end of each 16-bit float bin
    bin_midpoint: torch.Tensor  # float32[65536]: the one midpoint inside that bin, or +inf


@functools.cache
def _tables(device: torch.device) -> _Tables:
    """Lookup tables for a fast exact nearest-code search.

    A float32's top 16 bits (sign, exponent, 7 mantissa bits) select a "bin" of relative width
    2**-7 < 0.8 %. Neighbouring codes are at least 1.4 % apart, so a bin holds at most one midpoint
    (tests check this for all 65,536 bins); the nearest index is then the bin's base index plus one
    if the value lies above that midpoint. Same answer as a binary search, a few times faster on CPU.
    """
    code = _build_dynamic_code()
    midpoints = (code[1:] + code[:-1]) / 2.0
    high = torch.arange(1 << 16, dtype=torch.int32)
    low = torch.where(high >= 1 << 15, 0xFFFF, 0).to(torch.int32)  # a negative bin's lowest value has all low bits set
    lowest = ((high << 16) | low).view(torch.float32)
    lowest = torch.where(torch.isnan(lowest), torch.zeros(()), lowest)  # NaN bins never occur: inputs are finite
    base = torch.bucketize(lowest, midpoints)  # number of midpoints strictly below the bin
    padded = torch.cat([midpoints, torch.tensor([float("inf")])])
    tables = _Tables(code, midpoints, base.to(torch.uint8), padded[base])
    return _Tables(*(t.to(device) for t in tables))


def _nearest_code(normalised: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest code for each (finite, contiguous float32) value; ties go to the lower code.

    Equal to ``torch.bucketize(normalised, midpoints)``, computed with the bin tables above.
    """
    tables = _tables(normalised.device)
    high = normalised.view(torch.int16)[1::2].int()  # little-endian: the high half of each float32
    return tables.bin_index[high] + (normalised > tables.bin_midpoint[high])


def dynamic_code() -> torch.Tensor:
    """A copy of the 256-entry signed dynamic code (float32, sorted ascending)."""
    return _tables(torch.device("cpu")).code.clone()


def max_abs_error_bound(absmax: torch.Tensor) -> torch.Tensor:
    """Per-block worst-case absolute error of a round trip: absmax * (largest gap between codes) / 2.

    The largest gap is in the top decade, (1 - 0.1) / 64; values below the smallest code (-0.993)
    are also within half that gap of it.
    """
    code = _tables(torch.device("cpu")).code
    return absmax.float() * float((code[1:] - code[:-1]).max()) / 2.0


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
        raise WireError("bad_tensor", f"q8 block size must be an int in [1, {MAX_BLOCK}], got {block!r}")


def _bnb() -> ModuleType | None:
    """bitsandbytes' functional module, or None; imported lazily because it is optional and slow."""
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception:  # noqa: BLE001 - any failure to load (no CUDA build, missing libs) means "not available"
        return None
    return bnb_functional


def quantize_blockwise(x: torch.Tensor, block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to (codes: uint8[numel], absmax: float32[ceil(numel / block)]), on x's device.

    Raises WireError("bad_tensor") for non-float dtypes and for NaN/inf values.
    """
    _check_block(block)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise WireError("bad_tensor", f"q8 quantizes float32/float16/bfloat16 tensors, not {x.dtype}")
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device)
    if flat.is_cuda and block in _BNB_BLOCKS and (bnb := _bnb()) is not None:
        # bnb's absmax skips NaN (fmaxf), so check the input itself; on a GPU this pass is cheap.
        _check_finite(flat)
        codes, state = bnb.quantize_blockwise(flat.contiguous(), blocksize=block)
        codes, absmax = codes.reshape(-1), state.absmax.float()
        zero = absmax == 0  # bnb computes 0 * (1/0) there; point those blocks at the exact 0.0 like we do
        if bool(zero.any()):
            codes[zero.repeat_interleave(block)[:n]] = ZERO_INDEX
        return codes, absmax
    return _quantize_torch(flat, block)


def _check_finite(values: torch.Tensor) -> None:
    if not bool(torch.isfinite(values).all()):
        raise WireError(
            "bad_tensor",
            "q8 cannot encode NaN or inf values; send this tensor with codec 'none' or 'float32' instead",
        )


def _quantize_torch(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    nblocks = -(-n // block)
    full = (n // block) * block
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    # a private, truly unit-stride float32 copy: we normalise it in place and view its bits
    values = torch.empty(n, dtype=torch.float32, device=flat.device).copy_(flat)
    if full:
        absmax[: full // block] = values[:full].view(-1, block).abs().amax(dim=1)
    if full < n:
        absmax[-1] = values[full:].abs().amax()
    _check_finite(absmax)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    if full:
        values[:full].view(-1, block).div_(scale[: full // block, None])
    if full < n:
        values[full:].div_(scale[-1])
    return _nearest_code(values), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, block: int = DEFAULT_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_blockwise: a flat tensor of ``codes.numel()`` values ``code[i] * absmax`` in ``dtype``.

    Computed in float32 and then cast, which is what bitsandbytes does too.
    """
    _check_block(block)
    n = codes.numel()
    nblocks = -(-n // block)
    if codes.dtype != torch.uint8 or absmax.dtype != torch.float32 or absmax.numel() != nblocks:
        raise WireError(
            "bad_tensor",
            f"q8 needs uint8 codes and {nblocks} float32 absmax values for {n} elements in blocks of {block}, "
            f"got {codes.dtype} codes and {absmax.numel()} {absmax.dtype} absmax values",
        )
    out = _tables(codes.device).code.index_select(0, codes.reshape(-1).int())
    full = (n // block) * block
    if full:
        out[:full].view(-1, block).mul_(absmax[: full // block, None])
    if full < n:
        out[full:].mul_(absmax[-1])
    return out if dtype == torch.float32 else out.to(dtype)
