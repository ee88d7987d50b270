"""Tensor wire format: exact or bounded round trips for every codec, strict validation of everything else."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.protocol import quant
from petal.protocol.errors import WireError
from petal.protocol.frames import pack_message, unpack_message
from petal.protocol.tensors import CODECS, DTYPES, FLOAT_DTYPES, all_finite, decode_tensor, encode_tensor

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4)


def _make(shape: list[int], dtype: torch.dtype, seed: int, layout: str) -> torch.Tensor:
    """A tensor of ``shape``; layout "t" or "s" makes it non-contiguous (transposed / strided view)."""
    g = torch.Generator().manual_seed(seed)
    big = list(shape)
    if layout == "s" and big:
        big[-1] *= 2
    if dtype == torch.bool:
        t = torch.rand(big, generator=g) > 0.5
    elif dtype.is_floating_point:
        t = (torch.randn(big, generator=g) * 10).to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), big, generator=g, dtype=torch.int64).to(dtype)
    if layout == "s" and big:
        t = t[..., ::2]
    if layout == "t" and t.dim() >= 2:
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    assert list(t.shape) == shape
    return t


def _wire(obj: dict) -> dict:
    """Through real msgpack, as on a stream."""
    return unpack_message(pack_message(obj))


def _decode(obj: dict, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable-buffer warning must not happen
        t = decode_tensor(obj, **kw)
    assert t.is_contiguous()
    if t.numel():  # writable: an in-place write of the same value must work
        first = t.reshape(-1)[:1]
        first.copy_(first.clone())
    return t


@given(shapes, st.sampled_from(sorted(DTYPES)), st.integers(0, 2**16), st.sampled_from("cts"))
@settings(max_examples=250, deadline=None)
def test_none_codec_is_bit_exact(shape, dtype_name, seed, layout):
    t = _make(shape, DTYPES[dtype_name], seed, layout)
    obj = encode_tensor(t)
    assert set(obj) == {"dtype", "shape", "codec", "data"} and obj["dtype"] == dtype_name
    back = _decode(_wire(obj))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8) if t.dtype == torch.bool else back, t)


def test_none_codec_keeps_nan_inf_and_negative_zero_bits():
    t = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45], dtype=torch.float32)
    back = _decode(_wire(encode_tensor(t)))
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))


@given(
    shapes,
    st.sampled_from(sorted(FLOAT_DTYPES)),
    st.sampled_from(["float16", "bfloat16"]),
    st.integers(0, 2**16),
    st.sampled_from("cts"),
)
@settings(max_examples=200, deadline=None)
def test_half_codecs_are_within_half_an_ulp(shape, dtype_name, codec, seed, layout):
    """Round to nearest: relative error <= 2**-11 (float16) or 2**-8 (bfloat16) for normal numbers,
    plus half the smallest subnormal step near zero."""
    t = _make(shape, DTYPES[dtype_name], seed, layout)
    back = _decode(_wire(encode_tensor(t, codec)))
    assert back.dtype == t.dtype and back.shape == t.shape
    rel, tiny = (2.0**-11, 2.0**-25) if codec == "float16" else (2.0**-8, 2.0**-134)
    x, y = t.double(), back.double()
    assert bool(((x - y).abs() <= x.abs() * rel + tiny).all())


@given(
    st.lists(st.integers(0, 9), min_size=0, max_size=3),
    st.sampled_from(sorted(FLOAT_DTYPES)),
    st.integers(0, 2**16),
    st.sampled_from("cts"),
    st.sampled_from([64, 7, 256]),
)
@settings(max_examples=200, deadline=None)
def test_q8_is_within_its_per_block_bound(shape, dtype_name, seed, layout, block):
    t = _make(shape, DTYPES[dtype_name], seed, layout)
    obj = encode_tensor(t, "q8", block=block)
    n = t.numel()
    assert len(obj["data"]) == n and len(obj["absmax"]) == 4 * -(-n // block) and obj["block"] == block
    back = _decode(_wire(obj))
    assert back.dtype == t.dtype and back.shape == t.shape
    absmax = torch.frombuffer(bytearray(obj["absmax"]), dtype=torch.float32) if n else torch.zeros(0)
    bound = (quant.max_abs_error_bound(absmax) + absmax * 2.0**-23).repeat_interleave(block)[:n]
    if t.dtype != torch.float32:  # the decoded float32 value is rounded once more to the tensor's dtype
        bound = bound + back.float().abs().reshape(-1) * torch.finfo(t.dtype).eps
    assert bool(((t.float().reshape(-1) - back.float().reshape(-1)).abs() <= bound).all())


def test_q8_size_on_the_wire():
    t = torch.randn(1, 128, 576)
    q8, none = len(pack_message(encode_tensor(t, "q8"))), len(pack_message(encode_tensor(t)))
    assert q8 / t.numel() < 1.07 and none / t.numel() > 4


@pytest.mark.parametrize(
    "t, codec, match",
    [
        (torch.arange(4), "q8", "codec 'q8' is for float"),
        (torch.arange(4), "float16", "is for float"),
        (torch.randn(4), "zstd", "unknown codec"),
        (torch.randn(4, dtype=torch.float64), "none", "cannot cross the wire"),
        (torch.tensor([1e5, 1.0]), "float16", "overflow"),
        (torch.tensor([math.nan, 1.0]), "q8", "NaN or inf"),
    ],
)
def test_encode_refuses_what_it_cannot_carry(t, codec, match):
    with pytest.raises(WireError, match=match) as info:
        encode_tensor(t, codec)
    assert info.value.code == "bad_tensor"


def test_half_codecs_pass_existing_inf_and_nan_through():
    t = torch.tensor([math.inf, -math.inf, math.nan, 2.0])
    back = decode_tensor(encode_tensor(t, "float16"))
    assert back[0] == math.inf and back[1] == -math.inf and back[2].isnan() and back[3] == 2.0


def test_requires_grad_and_views_encode_their_values():
    base = torch.randn(6, 6, requires_grad=True)
    view = base[1:5:2, ::3]
    back = decode_tensor(encode_tensor(view))
    assert torch.equal(back, view.detach()) and not back.requires_grad


def _valid(enc: str = "none", /, **over) -> dict:
    obj = encode_tensor(torch.randn(3, 5), enc)
    obj.update(over)
    return obj


@pytest.mark.parametrize(
    "obj, match",
    [
        ([], "must be a map"),
        (_valid(codec="gzip"), "'codec' must be"),
        (_valid(extra=1), "exactly the keys"),
        ({k: v for k, v in _valid().items() if k != "data"}, "exactly the keys"),
        (_valid("q8", codec="none"), "exactly the keys"),
        (_valid(dtype="float64"), "'dtype' must be"),
        (_valid(dtype=b"float32"), "'dtype' must be"),
        (_valid("float16", dtype="int32"), "cannot carry dtype"),
        (_valid(shape="3,5"), "list of ints"),
        (_valid(shape=[3, -5]), "non-negative"),
        (_valid(shape=[3, 5.0]), "non-negative ints"),
        (_valid(shape=[3, True, 5]), "non-negative ints"),
        (_valid(shape=[1] * 17), "dimensions"),
        (_valid(shape=[5, 3, 1, 1]), None),  # same numel: fine
        (_valid(shape=[4, 5]), "need 80"),
        (_valid(data="x" * 60), "must be bytes"),
        (_valid("q8", block=0), "'block'"),
        (_valid("q8", block=True), "'block'"),
        (_valid("q8", block=4), "'absmax' holds 4 bytes"),
        (_valid("q8", absmax=b"\x00\x00\xc0\x7f"), None),  # NaN absmax, right length: checked below
        (_valid("q8", absmax=b"\x00\x00\x80\xbf"), "finite and non-negative"),  # -1.0
        ({"dtype": "bool", "shape": [2], "codec": "none", "data": b"\x01\x02"}, "0 or 1"),
    ],
)
def test_decode_rejects_malformed(obj, match):
    if match is None:
        if obj.get("absmax") == b"\x00\x00\xc0\x7f":
            with pytest.raises(WireError, match="finite"):
                decode_tensor(obj)
        else:
            assert decode_tensor(obj).shape == tuple(obj["shape"])
        return
    with pytest.raises(WireError, match=match) as info:
        decode_tensor(obj)
    assert info.value.code == "bad_tensor"


@pytest.mark.parametrize("codec", CODECS)
def test_oversize_declared_shape_is_rejected_before_allocating(codec):
    obj = _valid(codec, shape=[2**40, 2**40, 2**40])  # 8e36 elements: any allocation attempt would fail loudly
    with pytest.raises(WireError) as info:
        decode_tensor(obj)
    assert info.value.code == "too_large"
    with pytest.raises(WireError, match="elements; the limit is 14") as info:
        decode_tensor(_valid(codec), max_elements=14)
    assert info.value.code == "too_large"
    with pytest.raises(WireError, match="needs 60 bytes; the limit is 59"):
        decode_tensor(_valid(codec), max_bytes=59)
    assert decode_tensor(_valid(codec), max_bytes=60, max_elements=15).shape == (3, 5)


def test_declared_size_is_checked_before_data_length():
    """A small message claiming a huge tensor gets too_large, not a length mismatch after allocating."""
    obj = {"dtype": "float32", "shape": [1 << 30], "codec": "none", "data": b""}
    with pytest.raises(WireError) as info:
        decode_tensor(obj, max_bytes=1 << 20)
    assert info.value.code == "too_large"


tensor_like = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPES, "float64", "", 3]),
        "shape": st.one_of(st.lists(st.integers(-3, 2**70), max_size=5), st.text(max_size=3), st.none()),
        "codec": st.sampled_from([*CODECS, "raw", None]),
        "data": st.one_of(st.binary(max_size=80), st.text(max_size=5), st.integers()),
        "absmax": st.one_of(st.binary(max_size=16), st.none()),
        "block": st.one_of(st.integers(-2, 2**21), st.booleans(), st.floats()),
        "junk": st.integers(),
    },
)
any_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=12,
)


@given(st.one_of(tensor_like, any_value))
@settings(max_examples=600, deadline=None)
def test_garbage_raises_only_wire_error(obj):
    try:
        t = decode_tensor(obj, max_bytes=1 << 16)
    except WireError:
        return
    assert isinstance(t, torch.Tensor) and t.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_any_nan_or_infinity(dtype: torch.dtype) -> None:
    x = torch.randn(4, 33, 64).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0, 0), (3, 32, 63), (2, 17, 5)):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
    both = x.clone()
    both[0, 0, 0], both[1, 1, 1] = float("inf"), float("-inf")  # their sum is NaN: still caught
    assert not all_finite(both)


def test_all_finite_refuses_sums_that_overflow() -> None:
    assert not all_finite(torch.full((2, 2, 2), 3e38))  # finite values whose float32 sum overflows (documented)
    assert all_finite(torch.full((2, 2, 2), 3e38, dtype=torch.float64))
