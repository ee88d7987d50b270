"""Property tests: tensor decoding, on any input, returns a bounded tensor or raises WireError/PetalError, nothing else
(issue #16 finding 5: a zero-size shape with a dimension >= 2**63 raised torch's RuntimeError, a 500)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.protocol.errors import PetalError, WireError
from petal.protocol.lora import parse_lora
from petal.protocol.tensors import CODECS, DTYPES, MAX_DIM, MAX_NDIM, decode_tensor, encode_tensor

MAX_BYTES = 1 << 20

dims = st.one_of(
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, MAX_DIM, MAX_DIM + 1]),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.none(),
)
shapes = st.one_of(st.lists(dims, max_size=MAX_NDIM + 3), st.tuples(dims, dims), dims, st.binary(max_size=4))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=64)
)
tensor_dicts = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), scalars),
        "shape": shapes,
        "codec": st.one_of(st.sampled_from(CODECS), scalars),
        "data": st.one_of(st.binary(max_size=256), scalars),
    },
    optional={
        "absmax": st.one_of(st.binary(max_size=64), scalars),
        "block": st.one_of(st.integers(min_value=-2, max_value=2**65), scalars),
        "extra": scalars,
    },
)


def _decode(obj: object) -> torch.Tensor | None:
    try:
        t = decode_tensor(obj, max_bytes=MAX_BYTES, max_elements=MAX_BYTES)
    except WireError:
        return None
    except PetalError:  # also allowed: any error with a code the API maps to a 4xx
        return None
    assert t.numel() * t.element_size() <= MAX_BYTES
    assert t.is_contiguous()
    return t


@settings(max_examples=400, deadline=None)
@given(tensor_dicts)
def test_decoding_any_tensor_dict_raises_only_wire_errors(obj: dict[str, object]) -> None:
    _decode(obj)


@settings(max_examples=200, deadline=None)
@given(st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars, max_size=6)))
def test_decoding_anything_else_raises_only_wire_errors(obj: object) -> None:
    assert _decode(obj) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.integers(min_value=0, max_value=4), st.sampled_from([2**40, 2**62, 2**63])), max_size=6),
    st.sampled_from(sorted(DTYPES)),
)
def test_shapes_with_zeros_and_huge_dims_never_reach_torch(shape: list[int], dtype: str) -> None:
    """Empty tensors have no bytes to check; their shape must still be one torch can hold."""
    numel = math.prod(shape)
    itemsize = DTYPES[dtype].itemsize
    obj = {"dtype": dtype, "shape": shape, "codec": "none", "data": bytes(numel * itemsize) if numel < 4096 else b""}
    t = _decode(obj)
    if t is not None:
        assert list(t.shape) == shape


@pytest.mark.parametrize(
    "shape", [[0, 2**63], [2**63, 0], [0, 2**64 - 1], [0, 2**62, 2**62], [0, MAX_DIM + 1], [0, 2**30, 2**30 + 1]]
)
def test_a_zero_size_tensor_with_a_huge_dimension_is_a_wire_error(shape: list[int]) -> None:
    with pytest.raises(WireError, match="empty tensor"):
        decode_tensor({"dtype": "float32", "shape": shape, "codec": "none", "data": b""})


def test_empty_tensors_still_round_trip() -> None:
    for shape in ([0], [0, 5], [3, 0, 7], [1, 0, MAX_DIM]):
        t = torch.empty(shape) if math.prod(max(d, 1) for d in shape) < 1 << 20 else None
        if t is None:
            obj = {"dtype": "float32", "shape": shape, "codec": "none", "data": b""}
            assert list(decode_tensor(obj).shape) == shape
        else:
            assert decode_tensor(encode_tensor(t)).shape == t.shape


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), st.one_of(tensor_dicts, scalars), max_size=4))
def test_parsing_any_lora_field_raises_only_petal_errors(obj: dict[str, object]) -> None:
    with contextlib.suppress(PetalError):  # anything else fails the test
        parse_lora(obj, max_bytes=MAX_BYTES)
