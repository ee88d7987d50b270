"""What one DHT node holds: ``PetalStorage``, verified records merged per signer, trimmed and expired.

It replaces the ``kademlia`` package's storage: one record per signer per key (never overwritten by another
peer), the freshest kept within ``VALUE_BUDGET`` bytes so a reply fits one datagram, expired entries culled on
every read, and a per-signer high-water mark so an old record cannot be replayed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from kademlia.storage import IStorage

from petal.protocol.records import (
    MAX_CLOCK_SKEW,
    MAX_TTL,
    VALUE_BUDGET,
    Entry,
    RecordError,
    key_digest,
    verify_entry,
)

__all__ = ["MAX_KEYS", "PetalStorage"]

log = logging.getLogger(__name__)

MAX_KEYS = 100_000  # distinct keys one node stores; beyond this new keys are refused


class PetalStorage(IStorage):  # type: ignore[misc, unused-ignore]  # kademlia is untyped: Any base (strict)
    """Per key: one verified record per signer, the freshest kept within VALUE_BUDGET bytes.

    Keyed by the kademlia digest of the string key; each record names its string key inside the signed
    payload, and we check it hashes to the digest it is stored under.
    """

    def __init__(self, value_budget: int = VALUE_BUDGET) -> None:
        self.value_budget = value_budget
        self._data: dict[bytes, dict[bytes, tuple[Entry, bytes]]] = {}
        # signer -> newest issued_at seen, kept after the entry expires so an old entry cannot be replayed
        self._high_water: dict[bytes, dict[bytes, float]] = {}

    # -- merging --

    def merge(self, dkey: bytes, record: bytes, now: float | None = None) -> Entry:
        """Verify and merge one record. Returns the stored Entry; raises RecordError saying why not."""
        now = time.time() if now is None else now
        entry = verify_entry(record, now=now)
        if key_digest(entry.key) != dkey:
            raise RecordError(f"record for key {entry.key!r} stored under a different key digest")
        self._cull(dkey, now)
        entries = self._data.get(dkey)
        if entries is None:
            if len(self._data) >= MAX_KEYS:
                raise RecordError("node stores too many keys")
            entries = self._data[dkey] = {}
        hw = self._high_water.setdefault(dkey, {})
        newest = hw.get(entry.public_key)
        if newest is not None and entry.issued_at <= newest:
            if not entries:
                self._drop_if_empty(dkey)
            raise RecordError("not newer than the signer's stored entry (replay or duplicate)")
        entries[entry.public_key] = (entry, bytes(record))
        hw[entry.public_key] = entry.issued_at
        self._trim(entries)
        if entry.public_key not in entries:
            raise RecordError("key is full of fresher entries")
        return entry

    def _trim(self, entries: dict[bytes, tuple[Entry, bytes]]) -> None:
        """Evict the stalest entries until the key fits its byte budget (so one reply fits one datagram)."""
        total = sum(len(r) for _, r in entries.values())
        for e, r in sorted(entries.values(), key=lambda er: er[0].issued_at):
            if total <= self.value_budget:
                break
            total -= len(r)
            del entries[e.public_key]

    def _cull(self, dkey: bytes, now: float) -> None:
        entries = self._data.get(dkey)
        if entries:
            for pk in [pk for pk, (e, _) in entries.items() if e.expires_at <= now]:
                del entries[pk]
        hw = self._high_water.get(dkey)
        if hw:
            horizon = now - MAX_TTL - MAX_CLOCK_SKEW
            for pk in [pk for pk, t in hw.items() if t < horizon]:
                del hw[pk]
        self._drop_if_empty(dkey)

    def _drop_if_empty(self, dkey: bytes) -> None:
        if not self._data.get(dkey):
            self._data.pop(dkey, None)
        if not self._high_water.get(dkey):
            self._high_water.pop(dkey, None)

    # -- reading --

    def entries(self, dkey: bytes, now: float | None = None) -> list[Entry]:
        """Unexpired entries under a key, freshest first."""
        return [e for e, _ in self._sorted(dkey, now)]

    def records(self, dkey: bytes, now: float | None = None) -> list[bytes]:
        """Unexpired wire records under a key, freshest first (what find_value replies carry)."""
        return [r for _, r in self._sorted(dkey, now)]

    def _sorted(self, dkey: bytes, now: float | None) -> list[tuple[Entry, bytes]]:
        self._cull(dkey, time.time() if now is None else now)
        return sorted(self._data.get(dkey, {}).values(), key=lambda er: -er[0].issued_at)

    def keys(self) -> list[bytes]:
        return list(self._data)

    # -- kademlia's IStorage interface (used by welcome_if_new replication and the hourly refresh) --

    def __setitem__(self, dkey: bytes, value: bytes | list[bytes]) -> None:
        for record in value if isinstance(value, list) else [value]:
            try:
                self.merge(dkey, record)
            except RecordError as e:
                log.debug("not storing record under %s: %s", dkey.hex(), e)

    def __getitem__(self, dkey: bytes) -> list[bytes]:
        records = self.records(dkey)
        if not records:
            raise KeyError(dkey)
        return records

    def get(self, dkey: bytes, default: list[bytes] | None = None) -> list[bytes] | None:
        return self.records(dkey) or default

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, list[bytes]]]:
        return []  # owners re-announce before expiry; holders never republish others' entries

    def __iter__(self) -> Iterator[tuple[bytes, list[bytes]]]:
        for dkey in self.keys():
            records = self.records(dkey)
            if records:
                yield dkey, records
