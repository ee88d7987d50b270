"""DHT record schema and signatures (no I/O).

A DHT key holds one entry per server. Each entry is signed by its server's ed25519 key over the canonical
msgpack of ``[key, public_key, value, issued_at, expires_at]``, so any node can check it without trusting
whoever relayed it, and a signature made for one key cannot be replayed under another.

On the wire a record is ``signature (64 bytes) || payload`` where payload is exactly the signed bytes:
the receiver verifies the bytes it got instead of re-encoding a decoded structure.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from petal.protocol.adapters import MAX_ADAPTERS, check_adapter_name
from petal.protocol.errors import WireError

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
MAX_TTL = 3600.0
"""Entries may not expire more than this many seconds after they were issued (owners re-announce)."""
MAX_CLOCK_SKEW = 60.0
"""How far in the future an ``issued_at`` may be before we call the signer's clock broken."""
MAX_RECORD_BYTES = 640
"""One server's entry, signature included. Keeps a full key's reply under one UDP datagram."""
MAX_DATAGRAM = 8137
"""Largest UDP message the kademlia/rpcudp stack delivers here (measured by the lead)."""
VALUE_BUDGET = 6400
"""Bytes of records one key may hold; the rest of a find_value reply carries the neighbour list."""
MAX_DEPTH = 4

MODELS_KEY = "_models"
STATES = ("joining", "online", "draining", "offline")
OFFLINE = "offline"
DRAINING = "draining"
"""A server that is leaving: it finishes its open sessions but takes no new ones (routers skip it)."""
STATE_FIELD = "st"
MAX_NEXT_PINGS = 4
"""Next-span servers a server record lists round trips to (Petals' ``next_pings``): enough to route around one slow
link, small enough for a DHT entry (``MAX_RECORD_BYTES``)."""
NEXT_PING_ID_CHARS = 8
"""Next pings name a peer by the last characters of its id (the whole id would not fit in an entry); a router
matches them against the ids it knows."""
PUBLIC_NAME_MAX = 32
"""Longest public name (``petald --public-name``) a server record carries, in characters."""
PUBLIC_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ._-@+()")


class RecordError(WireError):
    """A DHT record is malformed, badly signed, expired or too large (code ``too_large`` for size)."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(code, message)


class Signer(Protocol):
    """What signing needs from a node identity (``petal.daemon.identity.Identity`` fits)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def block_key(model_name: str, block: int) -> str:
    """The DHT key under which servers of ``block`` of ``model_name`` announce themselves."""
    if not isinstance(model_name, str) or not model_name or model_name == MODELS_KEY:
        raise RecordError(f"invalid model name {model_name!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise RecordError(f"block index must be a non-negative int, got {block!r}")
    return f"{model_name}.{block}"


def key_digest(key: str) -> bytes:
    """The 160-bit Kademlia id of a string key (what the ``kademlia`` package uses: SHA-1 of UTF-8)."""
    return hashlib.sha1(key.encode("utf-8")).digest()


# --- peer ids -------------------------------------------------------------------------------------------

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _base58(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))


@lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of an ed25519 key, without importing libp2p.

    libp2p inlines small keys: identity multihash (code 0x00) of the protobuf ``PublicKey{Type=Ed25519(1),
    Data=key}``, written in base58btc.
    """
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise RecordError(f"ed25519 public key must be {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    proto = b"\x08\x01\x12" + bytes([PUBLIC_KEY_BYTES]) + public_key
    return _base58(b"\x00" + bytes([len(proto)]) + proto)


# --- canonical encoding ---------------------------------------------------------------------------------


def _canonical(obj: Any, depth: int = 0) -> Any:
    """Sort dict keys and normalise tuples, refusing types that would not round-trip identically."""
    if depth > MAX_DEPTH:
        raise RecordError(f"record value nested deeper than {MAX_DEPTH} levels")
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise RecordError("record values must be finite numbers")
        return obj
    if isinstance(obj, (list, tuple)):
        return [_canonical(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise RecordError("record value dicts must have string keys")
        return {k: _canonical(obj[k], depth + 1) for k in sorted(obj)}
    raise RecordError(f"type {type(obj).__name__} cannot appear in a DHT record")


def _payload(key: str, public_key: bytes, value: dict[str, Any], issued_at: float, expires_at: float) -> bytes:
    packed: bytes = msgpack.packb(
        [key, public_key, _canonical(value), float(issued_at), float(expires_at)], use_bin_type=True
    )
    return packed


# --- entries --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One server's verified entry under one key. ``peer_id`` derives from ``public_key``, never from the value."""

    peer_id: str
    public_key: bytes
    value: dict[str, Any]
    issued_at: float
    expires_at: float
    key: str = ""
    signature: bytes = field(default=b"", repr=False)

    def to_record(self) -> bytes:
        """The wire form: signature || signed payload."""
        return self.signature + _payload(self.key, self.public_key, self.value, self.issued_at, self.expires_at)

    @property
    def state(self) -> str | None:
        """The server state if the value carries one (block and model entries do)."""
        state = self.value.get(STATE_FIELD)
        return state if isinstance(state, str) else None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)


def check_announcement(key: str, value: object) -> dict[str, Any]:
    """``value`` in canonical form if ``sign_entry`` can sign it under ``key``; else RecordError saying why.

    The same checks as signing (string keys, depth, finite floats, ints msgpack can hold, the record's size with
    its signature, key and timestamps), without a signer: callers check a value before they keep it.
    """
    if not isinstance(key, str) or not key:
        raise RecordError(f"a DHT key must be a non-empty string, got {key!r:.80}")
    if not isinstance(value, dict):
        raise RecordError(f"a DHT value must be a dict, got {type(value).__name__}")
    canonical: dict[str, Any] = _canonical(value)
    try:
        payload = _payload(key, bytes(PUBLIC_KEY_BYTES), canonical, 0.0, 0.0)  # timestamps: fixed-size floats
    except (OverflowError, ValueError, TypeError) as e:  # ints beyond 64 bits, strings that are not Unicode
        raise RecordError(f"record value cannot be encoded: {type(e).__name__}: {str(e)[:200]}") from None
    if SIGNATURE_BYTES + len(payload) > MAX_RECORD_BYTES:
        raise RecordError(
            f"record for {key[:60]!r} would be {SIGNATURE_BYTES + len(payload)} bytes, over the "
            f"{MAX_RECORD_BYTES}-byte limit of one DHT entry; use a shorter key and a smaller value",
            "too_large",
        )
    return canonical


def sign_entry(signer: Signer, key: str, value: dict[str, Any], *, issued_at: float, expires_at: float) -> Entry:
    """Sign ``value`` under ``key``. Raises RecordError if the value is not encodable or the record too big."""
    if not isinstance(value, dict):
        raise RecordError(f"a DHT value must be a dict, got {type(value).__name__}")
    if not expires_at > issued_at:
        raise RecordError("expires_at must be after issued_at")
    if expires_at - issued_at > MAX_TTL:
        raise RecordError(f"TTL {expires_at - issued_at:.0f}s exceeds the {MAX_TTL:.0f}s maximum; re-announce instead")
    value = check_announcement(key, value)
    public_key = bytes(signer.public_key)
    payload = _payload(key, public_key, value, issued_at, expires_at)
    if SIGNATURE_BYTES + len(payload) > MAX_RECORD_BYTES:
        raise RecordError(
            f"record for {key!r} is {SIGNATURE_BYTES + len(payload)} bytes, over the {MAX_RECORD_BYTES}-byte limit; "
            "announce fewer addresses or shorter fields",
            "too_large",
        )
    signature = signer.sign(payload)
    return Entry(
        peer_id_from_public_key(public_key), public_key, value, float(issued_at), float(expires_at), key, signature
    )


def verify_entry(
    record: bytes,
    *,
    key: str | None = None,
    now: float | None = None,
    max_ttl: float = MAX_TTL,
    max_skew: float = MAX_CLOCK_SKEW,
) -> Entry:
    """Check a wire record and return its Entry, or raise RecordError saying why it was refused.

    ``key``: if given, the key inside the signed payload must equal it (a record signed for one key is not
    valid under another). Expired records, TTLs over ``max_ttl`` and ``issued_at`` more than ``max_skew``
    seconds in the future are refused, so a node cannot pin an entry in place for long.
    """
    if not isinstance(record, (bytes, bytearray)):
        raise RecordError(f"record must be bytes, got {type(record).__name__}")
    record = bytes(record)
    if len(record) > MAX_RECORD_BYTES:
        raise RecordError(f"record is {len(record)} bytes, over the {MAX_RECORD_BYTES}-byte limit", "too_large")
    if len(record) <= SIGNATURE_BYTES:
        raise RecordError("record too short to hold a signature")
    signature, payload = record[:SIGNATURE_BYTES], record[SIGNATURE_BYTES:]
    try:
        decoded = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types on garbage
        raise RecordError(f"record payload is not msgpack: {e}") from None
    if not (isinstance(decoded, list) and len(decoded) == 5):
        raise RecordError("record payload must be [key, public_key, value, issued_at, expires_at]")
    rkey, public_key, value, issued_at, expires_at = decoded
    if not isinstance(rkey, str) or not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise RecordError("record key must be a string and public key 32 bytes")
    if not isinstance(value, dict) or not all(isinstance(t, float) for t in (issued_at, expires_at)):
        raise RecordError("record value must be a map and timestamps floats")
    if key is not None and rkey != key:
        raise RecordError(f"record was signed for key {rkey!r}, not {key!r}")
    if _payload(rkey, public_key, value, issued_at, expires_at) != payload:
        raise RecordError("record payload is not canonically encoded")
    try:
        VerifyKey(public_key).verify(payload, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise RecordError("bad signature") from None
    now = time.time() if now is None else now
    if not math.isfinite(issued_at) or not math.isfinite(expires_at):
        raise RecordError("record timestamps must be finite")
    if expires_at <= now:
        raise RecordError("record expired")
    if issued_at > now + max_skew:
        raise RecordError(f"record issued {issued_at - now:.0f}s in the future (clock skew?)")
    if expires_at <= issued_at or expires_at - issued_at > max_ttl or expires_at > now + max_ttl + max_skew:
        raise RecordError(f"record TTL out of bounds (max {max_ttl:.0f}s)")
    return Entry(peer_id_from_public_key(public_key), public_key, value, issued_at, expires_at, rkey, signature)


# --- value schemas --------------------------------------------------------------------------------------


def _field(value: dict[str, Any], name: str, types: type | tuple[type, ...], what: str) -> Any:
    got = value.get(name)
    if isinstance(got, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        got = None
    if not isinstance(got, types):
        raise RecordError(f"entry value field {name!r} ({what}) missing or of the wrong type")
    return got


def _next_pings(np: object) -> tuple[tuple[str, float], ...]:
    """The "np" field: {peer id suffix: round trip ms}, at most MAX_NEXT_PINGS entries of finite, non-negative ms."""
    if not isinstance(np, dict) or len(np) > MAX_NEXT_PINGS:
        raise RecordError(f"entry value field 'np' (next pings) must be a map of at most {MAX_NEXT_PINGS} entries")
    out = []
    for peer, ms in np.items():
        if not isinstance(peer, str) or not 0 < len(peer) <= NEXT_PING_ID_CHARS:
            raise RecordError(f"next pings are keyed by the last {NEXT_PING_ID_CHARS} characters of a peer id")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < 1e6:
            raise RecordError(f"next ping to {peer} must be a round trip in ms (0 to 1e6), got {ms!r}")
        out.append((peer, float(ms)))
    return tuple(out)


def _optional_str(value: dict[str, Any], name: str, what: str) -> str | None:
    got = value.get(name)
    if got is not None and not isinstance(got, str):
        raise RecordError(f"entry value field {name!r} ({what}) must be a string")
    return got


def check_public_name(name: object) -> str:
    """``name`` if a server record may carry it as its public name; else RecordError saying what is allowed.

    Short (``PUBLIC_NAME_MAX``) and plain (ASCII letters, digits, space and ``._-@+()``, no space at either end), so
    that every page and terminal shows it as written and it costs the record few bytes.
    """
    if not isinstance(name, str) or not name:
        raise RecordError("a public name must be a non-empty string")
    if len(name) > PUBLIC_NAME_MAX:
        raise RecordError(f"public name {name[:40]!r} is {len(name)} characters; use at most {PUBLIC_NAME_MAX}")
    if not set(name) <= PUBLIC_NAME_CHARS or name != name.strip():
        raise RecordError(
            f"public name {name!r} may hold only ASCII letters, digits, spaces (not at either end) and ._-@+()"
        )
    return name


def _adapter_names(names: object) -> tuple[str, ...]:
    """A server record's adapter names (field ``ad``), checked; RecordError saying what is wrong."""
    if not isinstance(names, list) or len(names) > MAX_ADAPTERS:
        raise RecordError(f"entry value field 'ad' (adapters) must be a list of at most {MAX_ADAPTERS} names")
    try:
        return tuple(check_adapter_name(n) for n in names)
    except WireError as e:
        raise RecordError(e.message) from None


@dataclass(frozen=True)
class ServerRecord:
    """What a server announces under each block key it serves, and what routers read back. Short field names on
    the wire; ``quant`` (``q``), ``fingerprint`` (``fp``), ``direct`` (``x``), ``public_name`` (``pn``),
    ``next_pings`` (``np``) and ``adapters`` (``ad``) are written only when set, so older readers and older records
    stay compatible."""

    addrs: tuple[str, ...]
    start: int
    end: int
    state: str
    throughput: float
    cache_tokens_left: int
    dtype: str
    version: int
    peer_id: str = ""  # filled from the signed entry, not carried in the value
    quant: str = ""  # weight quantization of the span ("none", "int8", ...)
    fingerprint: str | None = None  # the model version the server hosts; None: not announced
    direct: tuple[str, ...] = ()  # direct data plane addresses (/ip4/H/tcp/P/tls/p2p/ID); older servers have none
    public_name: str = ""  # petald --public-name: who runs the server, shown on dashboards; "" when not set
    next_pings: tuple[tuple[str, float], ...] = ()  # (peer id suffix, round trip ms) to next-span servers ("np")
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters it hosts (petald --adapter; "ad"), when any

    def to_value(self) -> dict[str, Any]:
        if self.state not in STATES:
            raise RecordError(f"state must be one of {STATES}, got {self.state!r}")
        if not 0 <= self.start < self.end:
            raise RecordError(f"span [{self.start}, {self.end}) is empty or negative")
        value: dict[str, Any] = {
            "a": list(self.addrs),
            "s": [self.start, self.end],
            STATE_FIELD: self.state,
            "t": float(self.throughput),
            "c": int(self.cache_tokens_left),
            "d": self.dtype,
            "v": int(self.version),
        }
        if self.quant:
            value["q"] = self.quant
        if self.fingerprint is not None:
            value["fp"] = self.fingerprint
        if self.direct:
            value["x"] = list(self.direct)
        if self.public_name:
            value["pn"] = check_public_name(self.public_name)
        if self.next_pings:
            value["np"] = {peer[-NEXT_PING_ID_CHARS:]: round(float(ms), 1) for peer, ms in self.next_pings}
            if len(value["np"]) > MAX_NEXT_PINGS:
                raise RecordError(f"at most {MAX_NEXT_PINGS} next pings fit in a server record")
        if self.adapters:
            value["ad"] = list(_adapter_names(list(self.adapters)))
        return value

    @classmethod
    def from_value(cls, value: dict[str, Any], peer_id: str = "") -> ServerRecord:
        """The record in ``value``; raises RecordError naming the first bad field."""
        if not isinstance(value, dict):
            raise RecordError(f"a server record must be a map, got {type(value).__name__}")
        addrs = _field(value, "a", list, "addresses")
        span = _field(value, "s", list, "span")
        state = _field(value, STATE_FIELD, str, "state")
        if not all(isinstance(a, str) for a in addrs):
            raise RecordError("addresses must be multiaddr strings")
        if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
            raise RecordError("span must be [start, end)")
        if state not in STATES or not 0 <= span[0] < span[1]:
            raise RecordError(f"bad state {state!r} or span {span!r}")
        throughput = float(_field(value, "t", (int, float), "throughput"))
        if not math.isfinite(throughput):
            raise RecordError("throughput must be a finite number")
        direct = value.get("x", [])
        if not isinstance(direct, list) or not all(isinstance(a, str) for a in direct):
            raise RecordError("entry value field 'x' (direct addresses) must be a list of multiaddr strings")
        public_name = value.get("pn")
        if public_name is not None:
            check_public_name(public_name)
        next_pings = _next_pings(value.get("np", {}))
        adapters = _adapter_names(value.get("ad", []))
        return cls(
            tuple(addrs),
            span[0],
            span[1],
            state,
            throughput,
            _field(value, "c", int, "cache tokens left"),
            _field(value, "d", str, "dtype"),
            _field(value, "v", int, "version"),
            peer_id,
            _optional_str(value, "q", "quant") or "",
            _optional_str(value, "fp", "fingerprint"),
            tuple(direct),
            public_name or "",
            next_pings,
            adapters,
        )

    @classmethod
    def from_entry(cls, entry: Entry) -> ServerRecord:
        return cls.from_value(entry.value, entry.peer_id)

    @classmethod
    def parse(cls, value: object, peer_id: str = "") -> ServerRecord | None:
        """The record in ``value``, or None if it is malformed: a bad entry from the network is skipped, not fatal."""
        if not isinstance(value, dict):
            return None
        try:
            return cls.from_value(value, peer_id)
        except RecordError:
            return None


@dataclass(frozen=True)
class ModelRecord:
    """What a server announces under MODELS_KEY so clients can discover which models the swarm serves."""

    name: str
    fingerprint: str
    num_blocks: int
    family: str
    state: str = "online"

    def to_value(self) -> dict[str, Any]:
        if self.state not in STATES:
            raise RecordError(f"state must be one of {STATES}, got {self.state!r}")
        return {
            "n": self.name,
            "f": self.fingerprint,
            "b": int(self.num_blocks),
            "fm": self.family,
            STATE_FIELD: self.state,
        }

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> ModelRecord:
        """The record in ``value``; raises RecordError naming the first bad field."""
        if not isinstance(value, dict):
            raise RecordError(f"a model record must be a map, got {type(value).__name__}")
        state = value.get(STATE_FIELD, "online")
        if state not in STATES:
            raise RecordError(f"bad state {state!r}")
        num_blocks = _field(value, "b", int, "num_blocks")
        if num_blocks < 1:
            raise RecordError(f"num_blocks must be positive, got {num_blocks}")
        return cls(
            _field(value, "n", str, "name"),
            _field(value, "f", str, "fingerprint"),
            num_blocks,
            _field(value, "fm", str, "family"),
            state,
        )

    @classmethod
    def parse(cls, value: object) -> ModelRecord | None:
        """The record in ``value``, or None if it is malformed (skipped, never fatal)."""
        if not isinstance(value, dict):
            return None
        try:
            return cls.from_value(value)
        except RecordError:
            return None


MORE_MODELS_FIELD = "o"
"""Where one signer's MODELS_KEY entry lists its other models (a daemon serving several models has one entry)."""
MAX_MODELS_PER_ENTRY = 4
"""Models one MODELS_KEY entry may list: keeps it under MAX_RECORD_BYTES (a daemon serves at most this many)."""


def models_value(records: list[ModelRecord]) -> dict[str, Any]:
    """One signer's MODELS_KEY value for ``records`` (at least one): the first at the top level, which is all that
    older readers see, the others under ``MORE_MODELS_FIELD``."""
    if not 1 <= len(records) <= MAX_MODELS_PER_ENTRY:
        raise RecordError(f"a models entry lists 1 to {MAX_MODELS_PER_ENTRY} models, not {len(records)}")
    value = records[0].to_value()
    if len(records) > 1:
        value[MORE_MODELS_FIELD] = [r.to_value() for r in records[1:]]
    return value


def parse_models(value: object) -> list[ModelRecord]:
    """Every well-formed model record in one MODELS_KEY value (malformed ones are skipped, never fatal)."""
    first = ModelRecord.parse(value)
    more = value.get(MORE_MODELS_FIELD) if isinstance(value, dict) else None
    extra = [ModelRecord.parse(v) for v in more[:MAX_MODELS_PER_ENTRY]] if isinstance(more, list) else []
    return [r for r in (first, *extra) if r is not None]


# --- mismatch reports -----------------------------------------------------------------------------------

REPORT_TTL = 1800.0
"""Seconds a mismatch report lives: long enough for others to see it, short enough that a fixed server recovers."""
REPORT_MARK = "mismatch"


def report_key(model_name: str, peer_id: str) -> str:
    """The DHT key of mismatch reports about one server of one model: one entry per signer (the DHT keeps one entry
    per signer per key), so however often a client reports a server, it counts once."""
    if not isinstance(peer_id, str) or not peer_id or "." in peer_id:
        raise RecordError(f"invalid peer id {peer_id!r}")
    block_key(model_name, 0)  # the same checks of the model name
    return f"{model_name}.{REPORT_MARK}.{peer_id}"


@dataclass(frozen=True)
class MismatchReport:
    """A signed claim by a client that a server returned wrong activations for blocks [start, end): the measured
    relative L2 distance and top-k agreement against a reference, and how it was found (``spot`` or ``verify``).

    On the wire: ``{"p": peer_id, "s": [start, end], "e": rel_l2, "k": topk, "w": how}``; the signer comes from the
    signed entry, never from the value."""

    peer_id: str
    start: int
    end: int
    rel_l2: float
    topk: float
    how: str = "spot"

    def to_value(self) -> dict[str, Any]:
        if not 0 <= self.start < self.end:
            raise RecordError(f"span [{self.start}, {self.end}) is empty or negative")
        if self.how not in ("spot", "verify"):
            raise RecordError(f"how must be spot or verify, got {self.how!r}")
        return {
            "p": self.peer_id,
            "s": [self.start, self.end],
            "e": round(float(self.rel_l2), 6),
            "k": round(float(self.topk), 4),
            "w": self.how,
        }

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> MismatchReport:
        """The report in ``value``; raises RecordError naming the first bad field."""
        if not isinstance(value, dict):
            raise RecordError(f"a mismatch report must be a map, got {type(value).__name__}")
        span = _field(value, "s", list, "span")
        if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span):
            raise RecordError("span must be [start, end)")
        if not 0 <= span[0] < span[1]:
            raise RecordError(f"bad span {span!r}")
        rel_l2 = float(_field(value, "e", (int, float), "relative L2"))
        topk = float(_field(value, "k", (int, float), "top-k agreement"))
        if not (math.isfinite(rel_l2) and math.isfinite(topk)):
            raise RecordError("relative L2 and top-k agreement must be finite numbers")
        how = _field(value, "w", str, "how it was found")
        if how not in ("spot", "verify"):
            raise RecordError(f"bad how {how!r}")
        return cls(_field(value, "p", str, "peer id"), span[0], span[1], rel_l2, topk, how)

    @classmethod
    def parse(cls, value: object) -> MismatchReport | None:
        """The report in ``value``, or None if it is malformed (skipped, never fatal)."""
        if not isinstance(value, dict):
            return None
        try:
            return cls.from_value(value)
        except RecordError:
            return None
