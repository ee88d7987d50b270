"""Property tests for decoding what a server receives (issue #16, "fuzz suites"): bytes off a stream through the frame
decoder, and any message through every `parse_*` validator, raise only `WireError`/`PetalError`, whatever the input;
what they accept keeps the server's limits. Tensor decoding on its own is covered in test_protocol_tensors.py.
"""

from __future__ import annotations

import contextlib
import math

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from petal.protocol.errors import ERROR_CODES, PetalError, WireError
from petal.protocol.frames import FrameDecoder, encode_frame
from petal.protocol.messages import (
    ServedSpan,
    parse_forward,
    parse_info_request,
    parse_open,
    parse_push,
    parse_step,
    validator,
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
SESSION = "ab" * 16

# integers across every msgpack width and the edges the validators compare against
ints = st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 10, 20, 32])
leaves = (
    st.none()
    | st.booleans()
    | ints
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=64)
    | st.sampled_from(["m", "f" * 16, "q8", "none", SESSION, "server"])
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
HOSTILE_SHAPES = [[0, 2**63], [0, 2**64 - 1, H], [2**63, 0, H], [1, 0, 2**63], [0, 2**62, 2**62], [2**32, 2**32, 0]]
shapes = (
    st.sampled_from(HOSTILE_SHAPES)
    | st.lists(st.integers(-2, 40), max_size=5)
    | st.lists(st.sampled_from([0, 1, 2, H, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), max_size=5)
    | values
)


@st.composite
def tensors(draw: st.DrawFn) -> object:
    """A tensor dict: valid, valid but for one field, or with a hostile shape and data fitting (or not) that shape."""
    base = encode_tensor(
        torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 3)), H), draw(st.sampled_from(["none", "q8"]))
    )
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return base
    if kind == 1:
        key = draw(st.sampled_from(["dtype", "shape", "codec", "data", "absmax", "block"]))
        return {**base, key: draw(values)}
    shape = draw(shapes)
    data = b""
    if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d < 2**20 for d in shape):
        numel = math.prod(shape)
        data = b"\0" * (4 * numel) if 4 * numel <= 4096 else b""
    dtype = draw(st.sampled_from(["float32", "float16", "int64", "bool", "float64", 3, None]))
    return {"dtype": dtype, "shape": shape, "codec": draw(st.sampled_from(["none", "q8", "zip"])), "data": data}


push_targets = st.fixed_dictionaries(
    {"peer": values, "session": st.sampled_from([SESSION, "AB" * 16, "", 5])},
    optional={"addrs": values | st.lists(st.text(max_size=300), max_size=20)},
)
FIELDS = [
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
    "push",
    "step",
    "tokens",
    "push_from",
    "push_to",
    "session",
    "lora",
]
field_values = values | tensors() | push_targets
near_valid = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=8).map(
    lambda d: {**HEADER, "hidden": encode_tensor(torch.randn(1, 2, H)), "session": SESSION, "step": 0, **d}
)
messages = st.one_of(values, near_valid)


def parsers(length: int = 2):
    return (
        lambda m: parse_info_request(m, SERVED),
        lambda m: parse_forward(m, SERVED),
        lambda m: parse_forward(m, SERVED, backward=True),
        lambda m: parse_open(m, SERVED),
        lambda m: parse_step(m, SERVED, blocks=10, batch=1, max_length=8, length=length),
        lambda m: parse_push(m, SERVED),
    )


def only_petal_errors(parse, msg: object) -> object:
    try:
        return parse(msg)
    except PetalError as e:
        assert e.code in ERROR_CODES and e.message, e
        assert e.code != "internal"
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
@example({**HEADER, "hidden": {"dtype": "float32", "shape": [0, 2**63], "codec": "none", "data": b""}})
@example(
    {"session": SESSION, "step": 0, "hidden": {"dtype": "float32", "shape": [0, 2**63], "codec": "none", "data": b""}}
)
@example({**HEADER, "hidden": {"dtype": "float32", "shape": [1, 2, H], "codec": "q8", "data": b"", "block": 2**64 - 1}})
def test_any_message_raises_only_petal_errors_and_what_passes_keeps_the_limits(msg: object) -> None:
    for parse in parsers():
        got = only_petal_errors(parse, msg)
        hidden = getattr(got, "hidden", None)
        if isinstance(hidden, torch.Tensor):  # accepted: it fits what the server hosts
            assert hidden.dim() == 3 and hidden.shape[-1] == H and 1 <= hidden.shape[0] <= SERVED.max_batch
            assert 1 <= hidden.shape[1] <= SERVED.max_length and bool(torch.isfinite(hidden).all())
        if got is not None and hasattr(got, "start"):
            assert SERVED.start <= got.start < got.end <= SERVED.end
        if got is not None and hasattr(got, "max_length"):
            assert 1 <= got.max_length <= SERVED.max_length and 1 <= got.batch <= SERVED.max_batch


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4), st.binary(max_size=64), st.data())
def test_stream_bytes_through_the_decoder_and_validators_raise_only_wire_and_petal_errors(
    msgs: list[object], garbage: bytes, data: st.DataObject
) -> None:
    """Frames of hostile messages, with garbage spliced in at a random place and fed in random chunks: the decoder
    raises only WireError, and every message it yields goes through every validator raising only PetalError."""
    stream = b"".join(encode_frame(m) for m in msgs)
    cut = data.draw(st.integers(0, len(stream)))
    stream = stream[:cut] + garbage + stream[cut:]
    decoder = FrameDecoder(max_frame=1 << 16)
    decoded: list[object] = []
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, max(1, len(stream) - pos)))
        try:
            decoded += decoder.feed(stream[pos : pos + step])
        except WireError as e:
            assert e.code in ("bad_frame", "too_large")
        pos += step
    with contextlib.suppress(WireError):
        decoder.eof()
    for msg in decoded:
        for parse in parsers():
            only_petal_errors(parse, msg)


def test_validator_turns_any_failure_into_the_callers_error() -> None:
    """The class fix of finding 5: whatever a validator misses fails as the sender's error, never "internal"."""

    def broken(kind: type[BaseException]):
        @validator("demo request")
        def parse(msg: object) -> None:
            raise kind("boom")

        return parse

    for kind, code in [
        (TypeError, "bad_frame"),
        (OverflowError, "bad_frame"),
        (KeyError, "bad_frame"),
        (IndexError, "bad_frame"),
        (ValueError, "bad_frame"),
        (RuntimeError, "bad_frame"),
        (MemoryError, "too_large"),
    ]:
        try:
            broken(kind)({})
        except WireError as e:
            assert e.code == code and "demo request" in e.message
        else:  # pragma: no cover - the validator must raise
            raise AssertionError(kind)
