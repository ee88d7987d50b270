"""Mismatch reports (``protocol/records.py``): a client's signed claim that a server returned wrong activations."""

from __future__ import annotations

import time

import pytest

from petal.daemon.identity import Identity
from petal.protocol.records import REPORT_TTL, MismatchReport, RecordError, report_key, sign_entry, verify_entry


def test_report_round_trips_signed_under_its_servers_key():
    signer, server = Identity.generate(), Identity.generate()
    report = MismatchReport(server.peer_id, 3, 6, 0.42, 0.5, "verify")
    assert MismatchReport.from_value(report.to_value()) == report
    key = report_key("tiny", server.peer_id)
    assert key == f"tiny.mismatch.{server.peer_id}"
    now = time.time()
    entry = verify_entry(
        sign_entry(signer, key, report.to_value(), issued_at=now, expires_at=now + REPORT_TTL).to_record()
    )
    assert entry.peer_id == signer.peer_id and MismatchReport.from_value(entry.value) == report


def test_malformed_reports_are_skipped_and_bad_ones_refused():
    good = MismatchReport("PEER", 3, 6, 0.42, 0.5).to_value()
    for bad in ({**good, "s": [6, 3]}, {**good, "w": "rumour"}, {**good, "e": float("nan")}, {**good, "p": 5}, "x"):
        assert MismatchReport.parse(bad) is None
    with pytest.raises(RecordError):
        MismatchReport("PEER", 3, 3, 0.1, 1.0).to_value()
    with pytest.raises(RecordError):
        report_key("_models", "PEER")
    with pytest.raises(RecordError):
        report_key("tiny", "a.b")
