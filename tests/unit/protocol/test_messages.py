"""Validators of the block-serving messages: valid requests pass, anything else raises PetalError, never a crash."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.protocol.errors import PetalError, WireError
from petal.protocol.messages import (
    ServedSpan,
    check_reply,
    parse_forward,
    parse_info_request,
    parse_open,
    parse_step,
)
from petal.protocol.tensors import encode_tensor

H = 8
SERVED = ServedSpan(
    "m",
    "f" * 16,
    10,
    20,
    hidden_size=H,
    max_batch=4,
    max_length=32,
    max_tensor_bytes=64 * 1024,
    max_request_bytes=96 * 1024,
)
HEADER = {"model": "m", "fingerprint": "f" * 16, "start": 10, "end": 20}


def t(*shape: int, dtype: torch.dtype = torch.float32) -> dict:
    return encode_tensor(torch.ones(shape, dtype=dtype) if dtype != torch.float32 else torch.randn(shape))


def test_valid_requests_parse() -> None:
    parse_info_request({"model": "m"}, SERVED)
    req = parse_forward(
        {
            **HEADER,
            "start": 12,
            "end": 15,
            "hidden": t(2, 5, H),
            "mask": t(2, 5, dtype=torch.int64),
            "prompts": t(3, 1, 2, H),
            "codec": "none",
        },
        SERVED,
    )
    assert (req.start, req.end, req.codec, req.mask.dtype) == (12, 15, "none", torch.long)
    req = parse_forward({**HEADER, "hidden": t(1, 3, H), "grad": t(1, 3, H)}, SERVED, backward=True)
    assert req.grad is not None and req.codec == "q8"
    opened = parse_open({**HEADER, "max_length": 32, "batch": 4}, SERVED)
    assert (opened.max_length, opened.batch) == (32, 4)
    step = parse_step(
        {"hidden": t(2, 1, H), "mask": t(2, 4, dtype=torch.int64), "position": 3},
        SERVED,
        blocks=10,
        batch=2,
        max_length=8,
        length=3,
    )
    assert step.position == 3
    assert parse_step({"hidden": t(2, 1, H)}, SERVED, blocks=10, batch=2, max_length=8, length=5).position == 5


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"model": "other"}, "unknown_block", "hosts model 'm'"),
        ({"fingerprint": "0" * 16}, "unknown_block", "fingerprint"),
        ({"start": 5}, "unknown_block", "[10, 20)"),
        ({"end": 21}, "unknown_block", "[10, 20)"),
        ({"start": 15, "end": 15}, "unknown_block", ""),
        ({"start": True}, "bad_frame", "integer"),
        ({"hidden": t(2, 5, H + 1)}, "wrong_shape", f"{H}]"),
        ({"hidden": t(5, 1, H)}, "wrong_shape", "max_batch"),
        ({"hidden": t(1, 0, H)}, "wrong_shape", "no tokens"),
        ({"hidden": t(1, 33, H)}, "max_length", "32"),
        ({"hidden": t(2, 5, dtype=torch.int64)}, "bad_tensor", "floating"),
        ({"hidden": encode_tensor(torch.full((1, 1, H), float("inf")))}, "bad_tensor", "NaN or infinite"),
        ({"hidden": t(16, 1000, H)}, "too_large", "limit"),
        ({"mask": t(2, 4, dtype=torch.int64)}, "wrong_shape", "[2, 5]"),
        ({"mask": encode_tensor(torch.full((2, 5), 2))}, "bad_request", "0 (padding)"),
        ({"prompts": t(9, 2, 1, H)}, "wrong_shape", "blocks=10"),
        ({"prompts": t(10, 2, 6, H)}, "wrong_shape", "6 tokens"),
        ({"codec": "gzip"}, "bad_request", "codec"),
        ({"hidden": None}, "bad_frame", "missing"),
    ],
)
def test_bad_forward_fields(change: dict, code: str, words: str) -> None:
    msg = {**HEADER, "hidden": t(2, 5, H), **change}
    with pytest.raises(PetalError) as e:
        parse_forward(msg, SERVED)
    assert e.value.code == code and words in e.value.message


def test_request_total_size_and_backward_grad() -> None:
    big = {**HEADER, "hidden": t(4, 30, H), "grad": t(4, 30, H)}  # 2 x 3.75 KiB: fine
    parse_forward(big, SERVED, backward=True)
    small = ServedSpan(**{**SERVED.__dict__, "max_request_bytes": 5_000})
    with pytest.raises(WireError) as e:
        parse_forward(big, small, backward=True)
    assert e.value.code == "too_large"
    with pytest.raises(PetalError) as e:
        parse_forward({**HEADER, "hidden": t(1, 3, H), "grad": t(1, 2, H)}, SERVED, backward=True)
    assert e.value.code == "wrong_shape"
    with pytest.raises(WireError):
        parse_forward({**HEADER, "hidden": t(1, 3, H)}, SERVED, backward=True)  # no grad


def test_bad_open_and_steps() -> None:
    for change, code in [
        ({"max_length": 33}, "max_length"),
        ({"max_length": 0}, "bad_request"),
        ({"batch": 5}, "wrong_shape"),
        ({"batch": "1"}, "bad_frame"),
        ({"end": 30}, "unknown_block"),
    ]:
        with pytest.raises(PetalError) as e:
            parse_open({**HEADER, "max_length": 8, "batch": 1, **change}, SERVED)
        assert e.value.code == code, change
    ctx = dict(blocks=10, batch=2, max_length=8, length=3)
    for msg, code in [
        ({"hidden": t(2, 6, H)}, "max_length"),
        ({"hidden": t(1, 1, H)}, "wrong_shape"),
        ({"hidden": t(2, 1, H), "position": 4}, "bad_request"),
        ({"hidden": t(2, 1, H), "position": -1}, "bad_request"),
        ({"hidden": t(2, 1, H), "position": 1.5}, "bad_frame"),
        ({"hidden": t(2, 1, H), "mask": t(2, 1, dtype=torch.int64)}, "wrong_shape"),
        ({"hidden": t(2, 1, H), "prompts": t(3, 2, 1, H)}, "wrong_shape"),
    ]:
        with pytest.raises(PetalError) as e:
            parse_step(msg, SERVED, **ctx)
        assert e.value.code == code, msg


def test_check_reply() -> None:
    assert check_reply({"hidden": 1}, "hidden") == {"hidden": 1}
    with pytest.raises(PetalError) as e:
        check_reply({"error": {"code": "busy", "message": "full"}}, "hidden")
    assert e.value.code == "busy" and type(e.value) is PetalError
    with pytest.raises(WireError):
        check_reply({"other": 1}, "hidden")
    with pytest.raises(WireError):
        check_reply({"error": "nope"})


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
tensor_like = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "int64", "bool", "float64", 3]),
        "shape": st.lists(st.integers(-2, 40), max_size=5) | msgpack_values,
        "codec": st.sampled_from(["none", "q8", "float16", "x"]),
        "data": st.binary(max_size=256) | msgpack_values,
    },
    optional={"absmax": st.binary(max_size=16), "block": st.integers(-1, 100)},
)
field_values = msgpack_values | tensor_like | st.sampled_from([10, 20, 15, "m", "f" * 16, "q8"])
near_valid = st.dictionaries(
    st.sampled_from(
        [
            "model",
            "fingerprint",
            "start",
            "end",
            "hidden",
            "mask",
            "prompts",
            "grad",
            "codec",
            "max_length",
            "batch",
            "position",
        ]
    ),
    field_values,
    max_size=8,
).map(lambda d: {**HEADER, "hidden": t(1, 2, H), **d})


@settings(max_examples=300, deadline=None)
@given(st.one_of(msgpack_values, near_valid))
def test_garbage_raises_only_petal_errors(msg: object) -> None:
    for parse in (
        lambda m: parse_info_request(m, SERVED),
        lambda m: parse_forward(m, SERVED),
        lambda m: parse_forward(m, SERVED, backward=True),
        lambda m: parse_open(m, SERVED),
        lambda m: parse_step(m, SERVED, blocks=10, batch=1, max_length=8, length=2),
        lambda m: check_reply(m, "hidden"),
    ):
        try:
            parse(msg)
        except PetalError as e:
            assert e.message and e.code
