"""The error family: codes survive a round trip through the wire, and bad error dicts are rejected."""

import pickle

import pytest

from petal.protocol.errors import ERROR_CODES, MAX_MESSAGE_CHARS, WIRE_ERROR_CODES, PetalError, WireError
from petal.protocol.frames import pack_message, unpack_message

EXPECTED = {
    "bad_frame",
    "bad_tensor",
    "too_large",
    "bad_request",
    "unknown_block",
    "wrong_shape",
    "max_length",
    "busy",
    "timeout",
    "not_found",
    "version_mismatch",
    "internal",
    "unavailable",
}


def test_known_codes_are_the_agreed_set():
    assert set(ERROR_CODES) == EXPECTED
    assert set(ERROR_CODES) >= WIRE_ERROR_CODES
    assert all(ERROR_CODES.values())


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_round_trip_through_msgpack(code):
    cls = WireError if code in WIRE_ERROR_CODES else PetalError
    err = cls(code, f"something about {code}")
    back = PetalError.from_wire(unpack_message(pack_message(err.to_wire())))
    assert type(back) is cls
    assert (back.code, back.message) == (err.code, err.message)
    assert str(back) == f"{code}: something about {code}" and back.known


def test_unknown_code_from_newer_peer_is_kept():
    err = PetalError.from_wire({"code": "quota_exceeded", "message": "slow down"})
    assert type(err) is PetalError and err.code == "quota_exceeded" and not err.known


def test_long_message_is_truncated():
    err = PetalError.from_wire({"code": "internal", "message": "x" * 100_000})
    assert len(err.message) == MAX_MESSAGE_CHARS + 1


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        "busy",
        {"code": "busy"},
        {"message": "m"},
        {"code": "busy", "message": "m", "extra": 1},
        {"code": 3, "message": "m"},
        {"code": "Busy!", "message": "m"},
        {"code": "", "message": "m"},
        {"code": "busy", "message": b"m"},
        {"code": "x" * 65, "message": "m"},
    ],
)
def test_from_wire_rejects_malformed(bad):
    with pytest.raises(WireError) as info:
        PetalError.from_wire(bad)
    assert info.value.code == "bad_frame"


def test_constructor_validates():
    with pytest.raises(ValueError):
        WireError("busy", "not a wire code")
    with pytest.raises(ValueError):
        PetalError("Not A Code", "m")
    with pytest.raises(TypeError):
        PetalError("busy", 3)  # type: ignore[arg-type]


def test_errors_pickle_locally():
    """Exceptions cross process pools (never the network); args must rebuild them."""
    err = pickle.loads(pickle.dumps(WireError("too_large", "big")))
    assert type(err) is WireError and err.code == "too_large" and err.message == "big"
