"""Request and reply bodies of the control API: reading JSON or msgpack bodies within limits, and replying in kind.

The fields inside a body are read with ``petal.protocol.socket_api`` (shared with petalctl); tensors with
``tensor_field`` here. Every malformed body is a ``PetalError`` whose message says what to send instead.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import TYPE_CHECKING, Any, Final

import msgpack
from aiohttp import web

from petal.protocol.errors import PetalError, WireError
from petal.protocol.frames import unpack_message
from petal.protocol.socket_api import MSGPACK

if TYPE_CHECKING:  # torch loads where a tensor is first read or written: /v1/status answers without it
    import torch

MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
"""Largest JSON body aiohttp reads (its ``client_max_size``)."""
MAX_BODY_BYTES: Final = 256 * 1024 * 1024
"""Largest msgpack body accepted; a bigger one is refused (413) from its Content-Length, before it is read."""
MAX_TENSOR_BYTES: Final = 256 * 1024 * 1024
"""Largest tensor in a body: ``petal.protocol.tensors.DEFAULT_MAX_BYTES`` (a unit test keeps them equal)."""
JSON: Final = "application/json"
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _not_json(e: Exception) -> PetalError:
    return PetalError("bad_request", f"request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range; send finite numbers only")
    return value


def parse_json(data: bytes | str) -> object:
    """Strict JSON: no NaN/Infinity (nor numbers that overflow to them), no lone surrogates; else a 400."""
    try:
        body = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _not_json(e) from None
    check_unicode(body)
    return body


def check_unicode(obj: object) -> None:
    """Refuse strings (keys too) that are not valid Unicode: JSON's ``"\\ud800"`` escapes decode to lone surrogates,
    which no tokenizer, file name or UTF-8 encoder accepts."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: list[object] = [item]
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for s in strings:
            if isinstance(s, str) and _SURROGATE.search(s):
                raise PetalError(
                    "bad_request",
                    f"the request holds a string with a lone UTF-16 surrogate ({s[:40]!r}); "
                    "send valid Unicode (escape pairs like \\ud83d\\ude00 are fine)",
                )


def _charset(request: web.Request) -> str:
    """The body's declared charset (JSON is UTF-8 unless a known one is named); an unknown one is a 400."""
    charset = request.charset or "utf-8"
    try:
        codecs.lookup(charset)
    except (LookupError, ValueError):
        raise PetalError(
            "bad_request", f"unknown charset {charset[:40]!r} in Content-Type; send UTF-8 JSON (Content-Type: {JSON})"
        ) from None
    return charset


async def read_json(request: web.Request) -> dict[str, Any]:
    """A JSON object body, at most ``MAX_REQUEST_BYTES`` (413 ``too_large`` above)."""
    charset = _charset(request)
    data = await read_body(request, MAX_REQUEST_BYTES)
    try:
        text = data.decode(charset)
    except UnicodeDecodeError as e:
        raise _not_json(e) from None
    except LookupError:  # a codec that is no text encoding (rot13)
        raise PetalError(
            "bad_request", f"charset {charset[:40]!r} in Content-Type is no text encoding; send UTF-8 JSON"
        ) from None
    body = parse_json(text)
    if not isinstance(body, dict):
        raise PetalError("bad_request", "request body must be a JSON object")
    return body


async def read_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, refusing (413) one over ``limit`` bytes by its declared length or while it streams in."""
    if request.content_length is not None and request.content_length > limit:
        raise PetalError(
            "too_large",
            f"the body is {request.content_length} bytes; at most {limit} are accepted: "
            "send a smaller batch or fewer tokens per call",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > limit:
            raise PetalError(
                "too_large", f"the body is over {limit} bytes; send a smaller batch or fewer tokens per call"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def wants_msgpack(request: web.Request) -> bool:
    return request.content_type == MSGPACK or MSGPACK in request.headers.get("Accept", "")


async def read_object(request: web.Request, *, allow_json: bool = False) -> dict[str, Any]:
    """A msgpack (or, where allowed, JSON) object body; anything else is a 400 that says what to send."""
    if request.content_type != MSGPACK:
        if not allow_json:
            raise PetalError("bad_request", f"send this endpoint a msgpack body with Content-Type: {MSGPACK}")
        return await read_json(request)
    data = await read_body(request)
    try:
        body = unpack_message(data)
    except WireError as e:
        raise PetalError("bad_request", f"request body is not valid msgpack: {e.message}") from None
    if not isinstance(body, dict):
        raise PetalError("bad_request", "the request body must be a map (object)")
    return body


def reply(obj: dict[str, Any], as_msgpack: bool = True, status: int = 200) -> web.Response:
    if not as_msgpack:
        return web.json_response(obj, status=status)
    return web.Response(body=msgpack.packb(obj, use_bin_type=True), content_type=MSGPACK, status=status)


def ndjson_line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def tensor_field(
    body: dict[str, Any], key: str, ndim: int, *, required: bool = False, floating: bool = True
) -> torch.Tensor | None:
    """``body[key]`` decoded: float hidden states (``floating``) or an integer/bool mask, with ``ndim`` dimensions."""
    import torch

    from petal.protocol.tensors import DTYPE_NAMES, FLOAT_DTYPES, decode_tensor

    obj = body.get(key)
    if obj is None:
        if required:
            raise PetalError("bad_request", f"{key!r} is required: a tensor map {{dtype, shape, codec, data}}")
        return None
    try:
        t = decode_tensor(obj, max_bytes=MAX_TENSOR_BYTES)
    except WireError as e:
        raise PetalError(e.code, f"{key!r}: {e.message}") from None
    if floating and DTYPE_NAMES[t.dtype] not in FLOAT_DTYPES:
        raise PetalError("bad_tensor", f"{key!r} must be float32, float16 or bfloat16, got {DTYPE_NAMES[t.dtype]}")
    if not floating and (t.dtype.is_floating_point or t.dtype == torch.uint8):
        raise PetalError(
            "bad_tensor",
            f"{key!r} must be int64, int32 or bool (1 = real token, 0 = padding), got {DTYPE_NAMES[t.dtype]}",
        )
    if t.dim() != ndim:
        raise PetalError("wrong_shape", f"{key!r} must have {ndim} dimensions, got shape {list(t.shape)}")
    return t


def required_tensor(body: dict[str, Any], key: str, ndim: int) -> torch.Tensor:
    t = tensor_field(body, key, ndim, required=True)
    assert t is not None  # required=True raised otherwise
    return t


def encode(t: torch.Tensor | None) -> dict[str, Any] | None:
    """A reply tensor, uncompressed (the socket is local)."""
    from petal.protocol.tensors import encode_tensor

    return None if t is None else encode_tensor(t, "none")
