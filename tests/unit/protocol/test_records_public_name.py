"""``ServerRecord.public_name`` (``petald --public-name``): optional on the wire, checked on both sides."""

from __future__ import annotations

import time

import pytest

from petal.daemon.config import Config, ConfigError
from petal.daemon.identity import Identity
from petal.protocol.records import (
    PUBLIC_NAME_MAX,
    RecordError,
    ServerRecord,
    block_key,
    check_public_name,
    sign_entry,
    verify_entry,
)

ALICE = Identity.generate()
ADDR = f"/ip4/203.0.113.5/tcp/31337/p2p/{ALICE.peer_id}"


def record(**fields: object) -> ServerRecord:
    return ServerRecord((ADDR,), 0, 30, "online", 812.5, 65536, "bfloat16", 1, **fields)


def test_a_name_round_trips_through_a_signed_entry():
    value = record(public_name="alice lab (GPU-2)").to_value()
    assert value["pn"] == "alice lab (GPU-2)"
    now = time.time()
    entry = sign_entry(ALICE, block_key("m", 0), value, issued_at=now, expires_at=now + 60)
    got = ServerRecord.from_entry(verify_entry(entry.to_record(), key=block_key("m", 0)))
    assert got.public_name == "alice lab (GPU-2)" and got.peer_id == ALICE.peer_id


def test_no_name_writes_no_field_and_old_records_read_as_unnamed():
    value = record().to_value()
    assert "pn" not in value  # what older servers wrote, byte for byte
    assert ServerRecord.from_value(value).public_name == ""


def test_a_longest_name_with_the_longest_addresses_still_fits_one_entry():
    direct = (f"/ip4/203.0.113.5/tcp/31338/tls/p2p/{ALICE.peer_id}",)
    value = record(public_name="n" * PUBLIC_NAME_MAX, quant="int8", fingerprint="f" * 16, direct=direct).to_value()
    now = time.time()
    sign_entry(ALICE, block_key("HuggingFaceTB/SmolLM2-135M-Instruct", 29), value, issued_at=now, expires_at=now + 60)


@pytest.mark.parametrize(
    "name",
    ["", " leading", "trailing ", "x" * (PUBLIC_NAME_MAX + 1), "<script>", "tab\there", "é", "new\nline", "a;b", 7],
)
def test_bad_names_are_refused_when_written_and_when_read(name: object):
    with pytest.raises(RecordError):
        check_public_name(name)
    if isinstance(name, str) and name:
        with pytest.raises(RecordError):
            record(public_name=name).to_value()
    with pytest.raises(RecordError, match="public name"):
        ServerRecord.from_value({**record().to_value(), "pn": name})
    assert ServerRecord.parse({**record().to_value(), "pn": name}) is None  # a bad entry from the network is skipped


def test_petald_refuses_a_bad_public_name_with_what_to_do():
    with pytest.raises(ConfigError, match=r"--public-name.*at most"):
        Config(new_swarm=True, public_name="x" * 40).validate()
    assert Config(new_swarm=True, public_name="bob").validate().public_name == "bob"
