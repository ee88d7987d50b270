"""Typed block replies: what servers send round-trips, error frames come back as the remote error, and malformed
replies raise only PetalErrors (a faulty server must not crash its client)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.protocol.errors import PetalError, WireError
from petal.protocol.replies import (
    BackwardReply,
    ForwardReply,
    InfoReply,
    OpenReply,
    PushAck,
    StepReply,
    decode_reply_tensor,
)
from petal.protocol.tensors import encode_tensor

T = encode_tensor(torch.ones(1, 2, 4), "none")
SESSION = "0123456789abcdef" * 2
REPLIES = [
    InfoReply(0, 10, 64, "m", "F", "llama", 30, "float32", "none", 4096, 8, 128, 12.5, 1, ("none", "q8"), 2, True),
    ForwardReply(T),
    BackwardReply(T),
    BackwardReply(T, T, {"scale": 1.0, "weights": {}}),
    OpenReply(16, SESSION, True),
    OpenReply(16),
    StepReply(5, T),
    StepReply(5, T, pushed=False),
    StepReply(7, skipped=True),
    PushAck(),
]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_round_trip(reply) -> None:
    assert type(reply).from_wire(reply.to_wire()) == reply


def test_wire_format_is_what_servers_send() -> None:
    assert ForwardReply(T).to_wire() == {"hidden": T}
    assert BackwardReply(T).to_wire() == {"grad": T, "grad_prompts": None}
    assert OpenReply(8, SESSION, False).to_wire() == {"ok": True, "max_length": 8, "session": SESSION, "push": False}
    assert StepReply(3, T).to_wire() == {"hidden": T, "position": 3}
    assert StepReply(3, T, pushed=True).to_wire() == {"hidden": T, "position": 3, "pushed": True}
    assert StepReply(3, skipped=True).to_wire() == {"skipped": True, "position": 3}
    assert PushAck().to_wire() == {"ok": True}
    assert set(REPLIES[0].to_wire()) >= {"start", "end", "hidden_size", "cache_tokens_left", "codecs", "push"}


def test_error_frames_and_malformed_replies() -> None:
    busy = {"error": {"code": "busy", "message": "full"}}
    for cls in (InfoReply, ForwardReply, BackwardReply, OpenReply, StepReply, PushAck):
        with pytest.raises(PetalError) as e:
            cls.from_wire(busy)
        assert e.value.code == "busy" and type(e.value) is PetalError
        with pytest.raises(WireError):
            cls.from_wire({"other": 1})
        with pytest.raises(WireError):
            cls.from_wire([1, 2])
    for bad in [
        lambda: InfoReply.from_wire({"start": "0", "end": 1, "hidden_size": 4}),
        lambda: InfoReply.from_wire({"start": 0, "end": 1, "hidden_size": 4, "codecs": "q8"}),
        lambda: InfoReply.from_wire({"start": 0, "end": 1, "hidden_size": 4, "push": 1}),
        lambda: ForwardReply.from_wire({"hidden": None}),
        lambda: BackwardReply.from_wire({"grad": T, "grad_lora": [1]}),
        lambda: OpenReply.from_wire({"ok": True, "max_length": "8"}),
        lambda: StepReply.from_wire({"position": 1}),
        lambda: StepReply.from_wire({"position": 1, "hidden": 3}),
    ]:
        with pytest.raises(WireError):
            bad()
    with pytest.raises(PetalError) as e:  # a faulty server, not a bad request: the session fails over from it
        StepReply.from_wire({"position": 1.5, "hidden": T})
    assert e.value.code == "internal"


def test_tolerated_fields_of_older_servers() -> None:
    assert InfoReply.from_wire({"start": 0, "end": 1, "hidden_size": 4}) == InfoReply(0, 1, 4)
    assert OpenReply.from_wire({"ok": True, "max_length": 8}) == OpenReply(8)
    assert OpenReply.from_wire({"ok": True, "max_length": 8, "session": "NOT-HEX", "push": True}).session is None
    assert StepReply.from_wire({"hidden": T, "position": 2, "pushed": "yes"}).pushed is None


def test_decode_reply_tensor_checks_shape() -> None:
    assert decode_reply_tensor(T, "hidden", shape=(1, 2, 4)).shape == (1, 2, 4)
    with pytest.raises(WireError) as e:
        decode_reply_tensor(T, "hidden", shape=(1, 3, 4))
    assert e.value.code == "bad_tensor"


values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70) | st.floats() | st.text(max_size=8) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
near_valid = st.dictionaries(
    st.sampled_from(
        [
            "start",
            "end",
            "hidden_size",
            "codecs",
            "push",
            "hidden",
            "grad",
            "grad_prompts",
            "grad_lora",
            "ok",
            "max_length",
            "session",
            "position",
            "skipped",
            "pushed",
            "error",
            "throughput",
        ]
    ),
    values | st.just(T) | st.just(SESSION),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(values, near_valid))
def test_garbage_raises_only_petal_errors(msg: object) -> None:
    for cls in (InfoReply, ForwardReply, BackwardReply, OpenReply, StepReply, PushAck):
        try:
            cls.from_wire(msg)
        except PetalError as e:
            assert e.message and e.code
