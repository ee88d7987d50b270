"""Frames: split and merged reads, limits enforced before buffering, and only WireError on garbage."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.protocol.errors import WireError
from petal.protocol.frames import FrameDecoder, encode_frame, pack_message, unpack_message

MESSAGES = [{"type": "step", "hidden": b"\x00" * 300, "n": 3}, [1, 2.5, None, True, "é"], {}, "x", 0, b""]
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


def test_every_split_point_gives_the_same_messages():
    stream = b"".join(encode_frame(m) for m in MESSAGES)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder(max_frame=1000)
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert got == MESSAGES, cut
        dec.eof()


def test_byte_by_byte():
    stream = b"".join(encode_frame(m) for m in MESSAGES)
    dec = FrameDecoder(max_frame=1000)
    got = [m for i in range(len(stream)) for m in dec.feed(stream[i : i + 1])]
    assert got == MESSAGES and dec.buffered == 0


@given(st.lists(msgpack_values, max_size=8), st.data())
@settings(max_examples=150, deadline=None)
def test_round_trip_any_chunking(messages, data):
    stream = b"".join(encode_frame(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    dec = FrameDecoder(max_frame=1 << 20)
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += dec.feed(stream[a:b])
    assert got == messages
    dec.eof()


def test_oversize_declared_length_fails_on_the_header_alone():
    dec = FrameDecoder(max_frame=100)
    with pytest.raises(WireError) as info:
        dec.feed(struct.pack(">I", 101))
    assert info.value.code == "too_large" and dec.buffered == 0
    with pytest.raises(WireError, match="already failed"):  # cannot resynchronise: stays broken
        dec.feed(encode_frame("ok"))
    assert dec.buffered == 0


def test_frame_at_the_limit_is_accepted():
    frame = encode_frame(b"x" * 95)
    dec = FrameDecoder(max_frame=len(frame) - 4)
    assert dec.feed(frame) == [b"x" * 95]
    with pytest.raises(WireError) as info:
        encode_frame(b"x" * 95, max_frame=len(frame) - 5)
    assert info.value.code == "too_large"


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 9])
def test_truncated_stream_is_reported_at_eof(cut):
    dec = FrameDecoder()
    assert dec.feed(encode_frame({"a": "bcdefgh"})[:cut]) == []
    with pytest.raises(WireError, match="stream ended inside a frame") as info:
        dec.eof()
    assert info.value.code == "bad_frame"


def test_bad_payload_error_keeps_stream_order_and_stream_usable():
    bad = struct.pack(">I", 1) + b"\xc1"  # 0xc1 is never valid msgpack
    dec = FrameDecoder()
    assert dec.feed(encode_frame(1) + encode_frame(2) + bad + encode_frame(3)) == [1, 2]
    with pytest.raises(WireError):
        dec.feed(encode_frame(4))
    assert dec.feed(b"") == [3, 4]
    with pytest.raises(WireError):
        dec.feed(bad)
    assert dec.feed(encode_frame(5)) == [5]


@given(st.binary(max_size=300), st.integers(0, 64))
@settings(max_examples=400, deadline=None)
def test_garbage_raises_only_wire_error(garbage, max_frame):
    dec = FrameDecoder(max_frame=max_frame)
    try:
        dec.feed(garbage)
        dec.feed(garbage[::-1])
        dec.eof()
    except WireError:
        pass


@pytest.mark.parametrize(
    "payload, why",
    [
        (msgpack.packb(msgpack.ExtType(5, b"x")), "extension"),
        (msgpack.packb([msgpack.Timestamp(1, 0)]), "timestamp"),
        (msgpack.packb({"a": {"b": msgpack.Timestamp(1, 0)}}), "timestamp"),
        (b"\x81\x01\x02", "map key"),  # {1: 2}
        (b"\xa2\xff\xfe", "utf-8"),
        (b"\x91\x01\x02", "extra data"),
        (b"\x91" * 5000 + b"\x00", "StackError"),  # nesting deeper than msgpack's stack
        (b"\xdd\x00\x10\x00\x00", "1048576 exceeds"),  # declares a 1M-entry array in 5 bytes
        (b"\xdf\x7f\xff\xff\xff", "exceeds"),  # a 2G-entry map
        (b"\xc6\x7f\xff\xff\xff", "incomplete|exceeds"),  # a 2 GiB bin, never allocated
        (b"", "Unpack"),
    ],
)
def test_unpack_message_rejects(payload, why):
    with pytest.raises(WireError, match=why) as info:
        unpack_message(payload)
    assert info.value.code == "bad_frame"


def test_unpack_bin_limit_and_types():
    assert unpack_message(pack_message({"k": b"\x00" * 10, "s": "str"})) == {"k": b"\x00" * 10, "s": "str"}
    with pytest.raises(WireError):
        unpack_message(pack_message(b"\x00" * 10), max_bin_len=9)


@pytest.mark.parametrize("obj", [object(), {1j: 2}, {"t": (1 + 2j)}, 2**64])
def test_pack_rejects_unsupported_values(obj):
    with pytest.raises(WireError) as info:
        pack_message(obj)
    assert info.value.code == "bad_frame"
