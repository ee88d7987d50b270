"""``check_announcement``: what PUT /v1/dht/{key} and ``Node.announce`` check before keeping a value is exactly
what signing accepts (issue #16 finding 6: values the signer refused were kept and re-announced every 40 s)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.daemon.identity import Identity
from petal.protocol.records import MAX_RECORD_BYTES, RecordError, check_announcement, sign_entry

BAD = [
    ({"a": 2**64}, "bad_frame", "cannot be encoded"),
    ({"a": -(2**63) - 1}, "bad_frame", "cannot be encoded"),
    ({"a": float("nan")}, "bad_frame", "finite"),
    ({"a": [[[[[1]]]]]}, "bad_frame", "nested deeper"),
    ({"a": "v" * MAX_RECORD_BYTES}, "too_large", "640-byte limit"),
    ({"\ud800": 1}, "bad_frame", "cannot be encoded"),
    ({1: 1}, "bad_frame", "string keys"),
    ({"a": {1, 2}}, "bad_frame", "cannot appear"),
]


@pytest.mark.parametrize(("value", "code", "says"), BAD)
def test_values_the_signer_refuses_are_refused_before_signing(value, code, says):
    with pytest.raises(RecordError, match=says) as info:
        check_announcement("k", value)
    assert info.value.code == code


def test_keys_count_towards_the_record_size():
    check_announcement("k" * 400, {"a": 1})
    with pytest.raises(RecordError) as info:
        check_announcement("k" * 700, {"a": 1})
    assert info.value.code == "too_large"
    for key in ("", None, 5):
        with pytest.raises(RecordError):
            check_announcement(key, {"a": 1})  # type: ignore[arg-type]  # hostile input on purpose


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=300), st.dictionaries(st.text(max_size=20), json_values, max_size=6))
def test_check_announcement_accepts_exactly_what_sign_entry_signs(key, value):
    identity = Identity.generate()
    try:
        check_announcement(key, value)
        ok = True
    except RecordError:
        ok = False
    try:
        entry = sign_entry(identity, key, value, issued_at=1000.0, expires_at=1060.0)
    except RecordError:
        assert not ok
        return
    assert ok
    assert len(entry.to_record()) <= MAX_RECORD_BYTES
