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
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

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


CODE_OF_STATUS: Final[dict[int, str]] = {404: "not_found", 408: "timeout", 413: "too_large", 431: "too_large"}
"""The error code of an HTTP error aiohttp itself raised (a bad request line, a body over its limit, ...)."""


def code_of_status(status: int) -> str:
    return CODE_OF_STATUS.get(status, "bad_request" if status < 500 else "internal")


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
        return error_response(e.status, code_of_status(e.status), e.text or e.reason or str(e))
    except Exception as e:
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(500, "internal", f"internal error: {type(e).__name__}: {e}; see the daemon log")


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, except that the errors its HTTP parser finds (a bad request line or header,
    garbage chunked encoding, oversize headers) are answered in JSON like every other error, not text/plain."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        code = code_of_status(status)
        if code == "internal":
            log.error("internal error reading a request", exc_info=exc)
        else:  # a hostile or broken client: no traceback per request in the log
            log.debug("malformed HTTP request: %s", message or exc)
        if request.writer.output_size > 0:  # part of a response is out: the connection can only be dropped
            raise ConnectionError("the response had already started; cannot send an error after it")
        if code == "internal":
            text = "internal error while reading the request; see the daemon log"
        else:
            detail = message or (type(exc).__name__ if exc is not None else "bad request")
            text = f"malformed HTTP request: {detail}"
        response = error_response(status, code, text[:500])
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    __slots__ = ()

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer HTTP parse errors in JSON (see ``JsonErrorHandler``)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same layout: only how connections are made differs
        return server
