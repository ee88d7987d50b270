"""DHT record schema and signatures: what a node accepts from the network and what it refuses."""

import time
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from petal.daemon.identity import Identity
from petal.protocol.records import (
    MAX_RECORD_BYTES,
    MAX_TTL,
    MODELS_KEY,
    SIGNATURE_BYTES,
    ModelRecord,
    RecordError,
    ServerRecord,
    block_key,
    peer_id_from_public_key,
    sign_entry,
    verify_entry,
)

ALICE = Identity.generate()
MALLORY = Identity.generate()
KEY = block_key("HuggingFaceTB/SmolLM2-135M", 3)


def server_value(state: str = "online") -> dict:
    addr = f"/ip4/203.0.113.5/tcp/31337/p2p/{ALICE.peer_id}"
    return ServerRecord((addr,), 0, 30, state, 812.5, 65536, "bfloat16", 1).to_value()


def signed(identity=ALICE, key=KEY, value=None, issued_at=None, ttl=60.0):
    issued_at = time.time() if issued_at is None else issued_at
    return sign_entry(identity, key, value or server_value(), issued_at=issued_at, expires_at=issued_at + ttl)


@pytest.mark.parametrize("identity", [Identity.generate() for _ in range(5)])
def test_peer_id_matches_libp2p(identity):
    assert peer_id_from_public_key(identity.public_key) == identity.peer_id


def test_round_trip_keeps_every_field():
    entry = signed()
    got = verify_entry(entry.to_record(), key=KEY)
    assert got == entry
    assert got.peer_id == ALICE.peer_id and got.public_key == ALICE.public_key and got.state == "online"
    record = ServerRecord.from_entry(got)
    assert record.peer_id == ALICE.peer_id and (record.start, record.end) == (0, 30) and record.throughput == 812.5


def test_record_is_compact():
    assert len(signed().to_record()) < 300


def test_record_error_is_a_wire_error_when_available():
    errors = pytest.importorskip("petal.protocol.errors")
    assert issubclass(RecordError, errors.WireError)


def test_forged_signature_refused():
    record = bytearray(signed().to_record())
    record[5] ^= 1
    with pytest.raises(RecordError, match="signature"):
        verify_entry(bytes(record))


def test_tampered_value_refused():
    entry = signed()
    forged = sign_entry(ALICE, KEY, {**entry.value, "t": 1e9}, issued_at=entry.issued_at, expires_at=entry.expires_at)
    mixed = entry.signature + forged.to_record()[SIGNATURE_BYTES:]
    with pytest.raises(RecordError, match="signature"):
        verify_entry(mixed)


def test_someone_else_signing_alices_key_is_a_different_signer():
    """Mallory can sign anything, but only as Mallory: the public key is inside the signed bytes."""
    entry = signed(MALLORY)
    record = bytearray(entry.to_record())
    at = bytes(record).index(MALLORY.public_key)
    record[at : at + 32] = ALICE.public_key
    with pytest.raises(RecordError, match="signature"):
        verify_entry(bytes(record))


def test_unsigned_and_garbage_refused():
    entry = signed()
    payload = entry.to_record()[SIGNATURE_BYTES:]
    with pytest.raises(RecordError):
        verify_entry(bytes(64) + payload)
    with pytest.raises(RecordError):
        verify_entry(payload[:40])
    with pytest.raises(RecordError):
        verify_entry("not bytes")  # type: ignore[arg-type]


def test_signed_for_another_key_refused():
    with pytest.raises(RecordError, match="signed for key"):
        verify_entry(signed().to_record(), key=block_key("HuggingFaceTB/SmolLM2-135M", 4))


def test_expired_refused():
    entry = signed(issued_at=time.time() - 100, ttl=50)
    with pytest.raises(RecordError, match="expired"):
        verify_entry(entry.to_record())
    assert verify_entry(entry.to_record(), now=entry.issued_at + 1) == entry


def test_absurd_times_refused():
    with pytest.raises(RecordError, match="exceeds"):
        signed(ttl=MAX_TTL + 1)
    future = signed(issued_at=time.time() + 3600)
    with pytest.raises(RecordError, match="future"):
        verify_entry(future.to_record())


def test_long_ttl_built_by_hand_refused():
    """A record that did not go through sign_entry's checks is still refused by the verifier."""
    now = time.time()
    payload = msgpack.packb([KEY, ALICE.public_key, {}, now, now + 10 * MAX_TTL], use_bin_type=True)
    with pytest.raises(RecordError, match="TTL"):
        verify_entry(ALICE.sign(payload) + payload)


def test_non_canonical_encoding_refused():
    now = time.time()
    value = {"b": 1, "a": 2}  # unsorted keys: same content, different bytes
    payload = msgpack.packb([KEY, ALICE.public_key, value, now, now + 60], use_bin_type=True)
    with pytest.raises(RecordError, match="canonical"):
        verify_entry(ALICE.sign(payload) + payload)


def test_oversized_value_refused_at_signing():
    with pytest.raises(RecordError, match="limit"):
        signed(value={"a": ["/ip4/1.2.3.4/tcp/1/" + "x" * 100] * 10})
    assert MAX_RECORD_BYTES < 8137


def test_unencodable_value_refused():
    with pytest.raises(RecordError):
        signed(value={"x": object()})
    with pytest.raises(RecordError):
        signed(value={1: "int key"})
    with pytest.raises(RecordError):
        signed(value={"t": float("nan")})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_random_bytes_only_raise_record_error(data):
    with pytest.raises(RecordError):
        verify_entry(data)


def test_schemas_round_trip_and_validate():
    model = ModelRecord("HuggingFaceTB/SmolLM2-135M", "sha256:abcd", 30, "llama")
    assert ModelRecord.from_value(model.to_value()) == model
    with pytest.raises(RecordError):
        ModelRecord.from_value({"n": "x"})
    with pytest.raises(RecordError):
        ServerRecord.from_value({**server_value(), "st": "dancing"})
    with pytest.raises(RecordError):
        ServerRecord.from_value({**server_value(), "s": [5, 5]})
    with pytest.raises(RecordError):
        ServerRecord((), 0, 1, "weird", 1.0, 1, "int8", 1).to_value()


def test_one_schema_for_writers_and_readers():
    """Routers read block and model entries with the types servers write them with; a bad entry is skipped."""
    full = ServerRecord(("/ip4/1.2.3.4/tcp/1",), 2, 6, "joining", 12.5, 64, "float32", 1, quant="int8", fingerprint="F")
    value = full.to_value()
    assert (value["q"], value["fp"]) == ("int8", "F")
    assert ServerRecord.parse(value, "peer") == replace(full, peer_id="peer")
    plain = ServerRecord.from_value(server_value())
    assert (plain.quant, plain.fingerprint) == ("", None) and "q" not in server_value() and "fp" not in server_value()
    # what a server that adds quant and fingerprint to the record's value writes reads back the same
    assert ServerRecord.from_value({**server_value(), "q": "none", "fp": "F"}).fingerprint == "F"
    for bad in [None, [], "x", {**server_value(), "fp": 3}, {**server_value(), "q": 1}, {"s": [0, 1]}]:
        assert ServerRecord.parse(bad) is None
    model = ModelRecord("m", "F", 4, "llama")
    assert ModelRecord.parse(model.to_value()) == model
    assert ModelRecord.parse(ModelRecord("m", "F", 4, "llama", "offline").to_value()).state == "offline"
    for bad in [
        None,
        {"n": "m"},
        {**model.to_value(), "b": 0},
        {**model.to_value(), "b": True},
        {**model.to_value(), "st": "?"},
    ]:
        assert ModelRecord.parse(bad) is None
    with pytest.raises(RecordError):
        ModelRecord.from_value({**model.to_value(), "b": -1})


def test_block_key():
    assert block_key("meta-llama/Llama-3.1-8B", 7) == "meta-llama/Llama-3.1-8B.7"
    for bad in [("", 1), ("m", -1), ("m", True), (MODELS_KEY, 0)]:
        with pytest.raises(RecordError):
            block_key(*bad)
