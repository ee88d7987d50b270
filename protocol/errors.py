"""One exception family for the whole system, so an error can cross the wire and be re-raised intact.

Every failure a peer may report travels as ``{"code": str, "message": str}``; the receiving side turns it
back into the same exception class with :meth:`PetalError.from_wire`. Codes are short stable strings that
programs branch on; messages are for humans and say what to do next.
"""

from __future__ import annotations

import re
from typing import Final

ERROR_CODES: Final[dict[str, str]] = {
    "bad_frame": "a frame or message could not be parsed or has the wrong structure",
    "bad_tensor": "a serialized tensor is malformed, inconsistent, or cannot be encoded as asked",
    "too_large": "a declared size exceeds the receiver's limit; nothing was allocated for it",
    "bad_request": "the message parsed but its fields are invalid for this request",
    "unknown_block": "the server does not host the requested block or span",
    "wrong_shape": "a tensor's shape does not fit the model (hidden size, batch, length)",
    "max_length": "the session would exceed its maximum number of tokens",
    "busy": "the server is at capacity; retry later or elsewhere",
    "timeout": "the operation did not finish in time",
    "not_found": "the requested session, model, record or route does not exist",
    "version_mismatch": "the peer speaks an incompatible protocol version",
    "internal": "an unexpected error on the remote side (a bug: please report it)",
    "unavailable": "no server can currently serve this (no route, all banned, shutting down)",
}
"""Known error codes and what each means. Peers may send codes added by newer versions; see from_wire."""

WIRE_ERROR_CODES: Final[frozenset[str]] = frozenset({"bad_frame", "bad_tensor", "too_large"})
"""The codes that mean "malformed input"; these map to :class:`WireError`."""

MAX_MESSAGE_CHARS: Final[int] = 4096
"""Longer messages from peers are truncated, so an error frame cannot carry a large payload."""

_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


class PetalError(Exception):
    """An error with a stable machine-readable ``code`` and a human ``message``."""

    def __init__(self, code: str, message: str) -> None:
        if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
            raise ValueError(f"error code must be a short snake_case string, got {code!r}")
        if not isinstance(message, str):
            raise TypeError(f"error message must be a str, got {type(message).__name__}")
        super().__init__(code, message)
        self.code: str = code
        self.message: str = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> dict[str, str]:
        """The error as a msgpack/JSON-able dict, for an error frame or an HTTP error body."""
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, d: object) -> PetalError:
        """Rebuild an error received from a peer; raises WireError if ``d`` is not a valid error dict.

        Unknown (newer) codes are kept as they are, so that callers can still show and log them.
        Malformed-input codes come back as :class:`WireError`, everything else as :class:`PetalError`.
        """
        if not isinstance(d, dict) or set(d) != {"code", "message"}:
            keys = sorted(map(repr, d)) if isinstance(d, dict) else type(d).__name__
            raise WireError("bad_frame", f"an error must be a dict with keys 'code' and 'message', got {keys}")
        code, message = d["code"], d["message"]
        if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
            raise WireError("bad_frame", f"error code must be a short snake_case string, got {code!r:.80}")
        if not isinstance(message, str):
            raise WireError("bad_frame", f"error message must be a string, got {type(message).__name__}")
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        if code in WIRE_ERROR_CODES:
            return WireError(code, message)
        return PetalError(code, message)

    @property
    def known(self) -> bool:
        """Whether this version knows the code (a newer peer may send codes we do not)."""
        return self.code in ERROR_CODES


class WireError(PetalError):
    """Malformed input: raised for every frame, message or tensor that fails validation."""

    def __init__(self, code: str, message: str) -> None:
        if code not in WIRE_ERROR_CODES:
            raise ValueError(f"WireError code must be one of {sorted(WIRE_ERROR_CODES)}, got {code!r}")
        super().__init__(code, message)
