"""What one DHT node holds: ``PetalStorage``, verified records merged per signer, trimmed and expired.

It replaces the ``kademlia`` package's storage: one record per signer per key (never overwritten by another
peer), at most ``VALUE_BUDGET`` bytes per key so a reply fits one datagram, expired entries culled on every
read, and a per-signer high-water mark so an old record cannot be replayed.

Identities are free, so a full key must not go to whoever signs the most records or dates them furthest
ahead. Each record is charged to a *source*: the network address it came from (``source_of``: an IPv4
address, an IPv6 /64). When a key is over its budget, entries are evicted in this order:

1. entries whose signer is not *vouched for* (its DHT node has not recently answered our ping with its id;
   see ``PetalProtocol.vouches``) before those of servers that answer;
2. then from the source holding the most bytes under the key, so an attacker with many identities on one
   address competes only with itself, and every source keeps at least its fair share of the budget;
3. then, within that source, the stalest, with ``issued_at`` clamped to the present (a record dated in the
   future buys no priority; among records that tie, the one dated furthest ahead goes first).

Which source a record is charged to is the caller's to say: the UDP protocol charges the address that delivered
it, relays included (``rpc.py`` says why), and our own entries are ``LOCAL_SOURCE``.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

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

__all__ = ["LOCAL_SOURCE", "MAX_KEYS", "MAX_SIGNERS_REMEMBERED", "PetalStorage", "Stored", "Vouch", "source_of"]

log = logging.getLogger(__name__)

MAX_KEYS = 100_000  # distinct keys one node stores; beyond this new keys are refused
MAX_SIGNERS_REMEMBERED = 1024
"""High-water marks kept per key. Beyond this the marks of signers no longer stored are forgotten (oldest
first), so a flood of throwaway identities cannot grow a node's memory; a forgotten signer's old record could
come back, but it competes for room like any other never-seen one."""
LOCAL_SOURCE = "local"
"""The source of this node's own entries (always vouched for)."""
UNKNOWN_SOURCE = "unknown"
"""The source of records stored through kademlia's ``storage[key] = value`` (not used by petal's own code)."""

Vouch = Callable[[bytes, str], bool]
"""``vouch(public_key, source)``: whether the signer's DHT node answers us, from ``source``."""


def source_of(host: str) -> str:
    """The source a record from ``host`` is charged to: an IPv4 address, an IPv6 /64 prefix (one site gets a
    whole /64, so its addresses are one source), anything else (a name) as given."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _local_only(public_key: bytes, source: str) -> bool:
    return source == LOCAL_SOURCE


class Stored(NamedTuple):
    """One stored record: the verified entry, its wire bytes, and the source it is charged to."""

    entry: Entry
    record: bytes
    source: str


class PetalStorage(IStorage):  # type: ignore[misc, unused-ignore]  # kademlia is untyped: Any base (strict)
    """Per key: one verified record per signer, within VALUE_BUDGET bytes, evicted fairly by source (module doc).

    Keyed by the kademlia digest of the string key; each record names its string key inside the signed
    payload, and we check it hashes to the digest it is stored under. ``vouch`` tells which signers answer us
    (the UDP protocol sets it; by default only this node's own entries are vouched for).
    """

    def __init__(self, value_budget: int = VALUE_BUDGET, vouch: Vouch = _local_only) -> None:
        self.value_budget = value_budget
        self.vouch: Vouch = vouch
        self._data: dict[bytes, dict[bytes, Stored]] = {}
        # signer -> newest issued_at seen, kept after the entry expires so an old entry cannot be replayed
        self._high_water: dict[bytes, dict[bytes, float]] = {}

    # -- merging --

    def merge(self, dkey: bytes, record: bytes, now: float | None = None, source: str = LOCAL_SOURCE) -> Entry:
        """Verify and merge one record, charged to ``source`` (``source_of`` the sender's address; ours: local).

        Returns the stored Entry; raises RecordError saying why not.
        """
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
        entries[entry.public_key] = Stored(entry, bytes(record), source)
        hw.pop(entry.public_key, None)  # re-insert: the marks stay in the order they were last raised
        hw[entry.public_key] = entry.issued_at
        self._trim(entries, now)
        self._forget_marks(hw, entries)
        if entry.public_key not in entries:
            raise RecordError("key is full: its room goes first to servers that answer, then evenly by source address")
        return entry

    def _trim(self, entries: dict[bytes, Stored], now: float) -> None:
        """Evict until the key fits its byte budget (so one reply fits one datagram), in the module doc's order."""
        total = sum(len(s.record) for s in entries.values())
        if total <= self.value_budget:
            return
        vouched = {pk: self.vouch(pk, s.source) for pk, s in entries.items()}
        load: dict[str, int] = {}
        for s in entries.values():
            load[s.source] = load.get(s.source, 0) + len(s.record)
        while total > self.value_budget:
            victim = max(
                entries.values(),
                key=lambda s: (
                    not vouched[s.entry.public_key],
                    load[s.source],
                    -min(s.entry.issued_at, now),
                    s.entry.issued_at,  # among equals, the one dated furthest ahead goes first
                    len(s.record),
                ),
            )
            del entries[victim.entry.public_key]
            total -= len(victim.record)
            load[victim.source] -= len(victim.record)

    @staticmethod
    def _forget_marks(hw: dict[bytes, float], entries: dict[bytes, Stored]) -> None:
        """Keep at most MAX_SIGNERS_REMEMBERED marks: drop the oldest of signers no longer stored."""
        excess = len(hw) - MAX_SIGNERS_REMEMBERED
        if excess <= 0:
            return
        for pk in [pk for pk in hw if pk not in entries][:excess]:
            del hw[pk]

    def _cull(self, dkey: bytes, now: float) -> None:
        entries = self._data.get(dkey)
        if entries:
            for pk in [pk for pk, s in entries.items() if s.entry.expires_at <= now]:
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
        return [s.entry for s in self._sorted(dkey, now)]

    def records(self, dkey: bytes, now: float | None = None) -> list[bytes]:
        """Unexpired wire records under a key, freshest first (what find_value replies carry)."""
        return [s.record for s in self._sorted(dkey, now)]

    def sources(self, dkey: bytes, now: float | None = None) -> dict[bytes, str]:
        """Which source each unexpired entry under a key is charged to, by signer public key (for tests, metrics)."""
        return {s.entry.public_key: s.source for s in self._sorted(dkey, now)}

    def _sorted(self, dkey: bytes, now: float | None) -> list[Stored]:
        self._cull(dkey, time.time() if now is None else now)
        return sorted(self._data.get(dkey, {}).values(), key=lambda s: -s.entry.issued_at)

    def keys(self) -> list[bytes]:
        return list(self._data)

    # -- kademlia's IStorage interface (used by welcome_if_new replication and the hourly refresh) --

    def __setitem__(self, dkey: bytes, value: bytes | list[bytes]) -> None:
        for record in value if isinstance(value, list) else [value]:
            try:
                self.merge(dkey, record, source=UNKNOWN_SOURCE)
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
