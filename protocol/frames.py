"""Length-prefixed msgpack frames for streams, and safe msgpack for request/response transports.

A frame is a 4-byte big-endian payload length followed by a msgpack payload. Receivers check the
declared length against their limit *before* buffering the payload, unpack with strict options (no
ext types, no timestamps, str/bytes map keys only, sizes bounded by the payload) and raise WireError
for anything malformed, so a hostile peer can cost us at most one frame's worth of memory.
"""

from __future__ import annotations

import struct
from typing import Final

import msgpack

from .errors import WireError

HEADER: Final[struct.Struct] = struct.Struct(">I")
MAX_PAYLOAD: Final[int] = (1 << 32) - 1
DEFAULT_MAX_FRAME: Final[int] = 64 * 1024 * 1024
MAX_STR_LEN: Final[int] = 1 << 20
MAX_ITEMS: Final[int] = 1 << 20


class WireCounters:
    """Bytes of frames this process encoded (to send) and fed to decoders (received), for ``/metrics``.

    Plain integer increments, no lock: an increment racing between the asyncio loop and the libp2p thread may be
    lost now and then, which a rate over a scrape interval does not notice.
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


WIRE: Final = WireCounters()


def pack_message(obj: object) -> bytes:
    """msgpack ``obj`` (dicts, lists, str, bytes, ints, floats, bool, None); no length prefix.

    Raises WireError("bad_frame") if ``obj`` holds anything else (tensors must go through encode_tensor).
    """
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError("bad_frame", f"cannot encode message: {e}") from e
    return packed


def encode_frame(obj: object, *, max_frame: int = MAX_PAYLOAD) -> bytes:
    """One length-prefixed frame; raises WireError("too_large") if the payload exceeds ``max_frame``."""
    payload = pack_message(obj)
    if len(payload) > min(max_frame, MAX_PAYLOAD):
        raise WireError("too_large", f"message of {len(payload)} bytes exceeds the frame limit of {max_frame}")
    WIRE.sent += HEADER.size + len(payload)
    return HEADER.pack(len(payload)) + payload


def _reject_ext(code: int, data: bytes) -> object:
    raise WireError("bad_frame", f"msgpack extension type {code} is not allowed")


def _reject_timestamps(obj: object) -> None:
    """msgpack decodes ext type -1 as a Timestamp without asking ext_hook; refuse those too."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, msgpack.Timestamp):
            raise WireError("bad_frame", "msgpack timestamps are not allowed; send seconds as a number")


def unpack_message(payload: bytes | bytearray | memoryview, *, max_bin_len: int | None = None) -> object:
    """Unpack one msgpack message safely; raises WireError("bad_frame") for anything malformed.

    Every declared length is bounded by the payload's own size (so a 5-byte message cannot make us
    allocate a million-entry list), strings by MAX_STR_LEN and ``max_bin_len`` when given.
    """
    size = len(payload)
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_bin_len=size if max_bin_len is None else min(size, max_bin_len),
            max_str_len=min(size, MAX_STR_LEN),
            max_array_len=min(size, MAX_ITEMS),
            max_map_len=min(size // 2, MAX_ITEMS),
            max_ext_len=size,
        )
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - hostile input: msgpack raises ValueError subclasses, TypeError, ...
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise WireError("bad_frame", f"malformed msgpack message ({detail:.400})") from None
    _reject_timestamps(obj)
    return obj


class FrameDecoder:
    """Incremental frame parser for a byte stream: feed it whatever arrived, get the complete messages.

    A declared length over ``max_frame`` raises WireError("too_large") at once, without waiting for or
    buffering the payload; the stream cannot be resynchronised after that, so the decoder stays
    broken and the caller should send an error frame and close. A frame whose payload is bad
    msgpack raises WireError("bad_frame") in stream order: messages decoded before it in the same
    ``feed`` are returned first and the error comes from the next ``feed`` or ``eof``. Such a frame is
    skipped and the stream stays usable, since its length was valid.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if isinstance(max_frame, bool) or not isinstance(max_frame, int) or not 0 <= max_frame <= MAX_PAYLOAD:
            raise ValueError(f"max_frame must be an int in [0, {MAX_PAYLOAD}], got {max_frame!r}")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._pending: WireError | None = None
        self._broken: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def _raise_held(self) -> None:
        if self._broken is not None:
            raise WireError(self._broken.code, f"stream already failed: {self._broken.message}")
        if self._pending is not None:
            error, self._pending = self._pending, None
            raise error

    def feed(self, data: bytes | bytearray | memoryview) -> list[object]:
        """Add received bytes; return every message completed by them, in order."""
        WIRE.received += len(data)
        if self._broken is None:
            self._buffer += data  # kept even when a pending error is raised below: it is the next frame's
        self._raise_held()
        buf = self._buffer
        messages: list[object] = []
        pos = 0
        try:
            while len(buf) - pos >= HEADER.size:
                (length,) = HEADER.unpack_from(buf, pos)
                if length > self.max_frame:
                    self._broken = WireError(
                        "too_large", f"peer declared a {length}-byte frame; the limit is {self.max_frame}"
                    )
                    raise self._broken
                end = pos + HEADER.size + length
                if len(buf) < end:
                    break
                start, pos = pos + HEADER.size, end
                try:
                    with memoryview(buf) as view, view[start:end] as payload:
                        messages.append(unpack_message(payload))
                except WireError as e:
                    if not messages:
                        raise
                    self._pending = e
                    break
        finally:
            del buf[:pos]
            if self._broken is not None:
                buf.clear()
        return messages

    def eof(self) -> None:
        """Call when the stream ends: raises WireError if an error is pending or a frame was cut off."""
        self._raise_held()
        if self._buffer:
            if len(self._buffer) < HEADER.size:
                detail = f"{len(self._buffer)} bytes of a 4-byte frame header"
            else:
                (length,) = HEADER.unpack_from(self._buffer)
                detail = f"{len(self._buffer) - HEADER.size} of {length} payload bytes"
            raise WireError("bad_frame", f"stream ended inside a frame ({detail})")
