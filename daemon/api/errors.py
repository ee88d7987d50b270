"""How errors leave the control API: the one map from error codes to HTTP statuses, and the middleware using it.

Handlers raise ``PetalError`` (or let one from the router or a session through); ``errors_as_json`` turns it, and
anything else, into ``{"error": {"code", "message"}}`` with a fitting status, so no request can take the daemon
down. A stream that has already sent its status reports an error in-band instead, with ``stream_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from petal.protocol.errors import PetalError
from petal.protocol.socket_api import error_body

log = logging.getLogger("petal.control")
stream_log = logging.getLogger("petal.api")

STATUS_OF_CODE: Final[dict[str, int]] = {
    "not_found": 404,
    "bad_request": 400,
    "wrong_shape": 400,
    "max_length": 400,
    "conflict": 409,
    "busy": 503,
    "unavailable": 503,
    "no_route": 503,
    "too_large": 413,
    "bad_tensor": 400,
    "bad_frame": 400,
    "unknown_block": 400,
    "timeout": 504,
}
UNKNOWN_CODE_STATUS: Final = 502
"""A code this table lacks came from a peer (a bad gateway, as far as the caller can tell)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def status_of(error: PetalError) -> int:
    """The HTTP status the API answers ``error`` with."""
    return STATUS_OF_CODE.get(error.code, UNKNOWN_CODE_STATUS)


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response(error_body(code, message), status=status)


def stream_error(e: BaseException) -> dict[str, dict[str, str]]:
    """The last line (or event) of a stream that failed after its status was sent."""
    if isinstance(e, PetalError):
        return error_body(e.code, e.message)
    stream_log.exception("generation failed mid-stream")
    return error_body("internal", f"{type(e).__name__}: {e}")


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PetalError as e:
        return error_response(status_of(e), e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, "bad_request" if e.status < 500 else "internal", e.reason or str(e))
    except Exception as e:
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(500, "internal", f"internal error: {type(e).__name__}: {e}; see the daemon log")
