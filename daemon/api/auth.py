"""Who may use the control API over TCP (``petald --http HOST:PORT``).

The Unix socket needs nothing here: its file mode (0660) and its directory's are its authentication. A TCP port,
though, can be reached by every local user and by every web page the user's browser opens, so a request that
arrives over TCP must pass, in this order:

1. ``Host`` names the configured address (or, bound to loopback, ``localhost``/``127.0.0.1``/``[::1]`` with the
   same port; bound to a wildcard address, an IP literal, ``localhost`` or this machine's name): a page whose
   domain was rebound to 127.0.0.1 sends its own name, and gets 421.
2. An ``Origin`` header, when there is one, is the API's own origin (``http://`` + Host): a page of another site
   gets 403, whatever it carries.
3. The token: ``Authorization: Bearer TOKEN`` (OpenAI clients send their API key so), or the cookie that the login
   URL ``http://HOST:PORT/?token=TOKEN`` sets (HttpOnly, SameSite=Strict) before redirecting to ``/`` without the
   token in the address bar. Compared in constant time; 401 without it, saying how to get it (``petalctl token``).
4. A POST, PUT or PATCH (or a DELETE with a body) is JSON or msgpack: 415 for anything else, so no "simple" CORS
   request (``text/plain``, forms) reaches an endpoint.

The token is generated once into the state dir (``http.token``, mode 0600) and read by ``petalctl token`` from the
socket-only endpoint ``GET /v1/http/token``, which works for members of the socket's group when the daemon runs as
a system user whose state dir they cannot read.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from aiohttp import web

from petal.daemon.api.errors import Handler, error_response
from petal.daemon.config import Config, ConfigError, parse_http_address
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import MSGPACK

TOKEN_FILE: Final = "http.token"
COOKIE_MAX_AGE: Final = 30 * 24 * 3600
"""Seconds a browser stays logged in after opening the login URL."""
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_TYPES: Final = frozenset({"application/json", MSGPACK})
"""Content types a write over TCP may carry: none of them is one a page can send without a CORS preflight."""
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "[::1]")
WILDCARDS: Final = frozenset({"0.0.0.0", "::"})
GUARD_KEY: Final = web.AppKey("http_guard", object)


class TokenError(ConfigError):
    """The token file exists but cannot be used; the message says what to do."""


def load_or_create_token(state_dir: Path) -> str:
    """The TCP API's token: read from ``state_dir/http.token``, or generated there (mode 0600) on first use."""
    path = Path(state_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _read_token(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise TokenError(f"cannot read the HTTP API token {path} ({e.strerror}): remove it to make a new one") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise TokenError(
                f"the HTTP API token {path} is not a private file of this user (mode 0600): remove it to make a new one"
            )
        token = f.read(4096).strip()
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise TokenError(f"the HTTP API token {path} is not a token petald wrote: remove it to make a new one")
    return token


@dataclass(frozen=True)
class HttpGuard:
    """The checks for one ``--http`` address and its token."""

    host: str
    port: int
    token: str

    @classmethod
    def from_config(cls, config: Config) -> HttpGuard:
        assert config.http is not None
        host, port = parse_http_address(config.http)
        return cls(host.lower(), port, load_or_create_token(Path(config.state_dir)))

    @property
    def cookie_name(self) -> str:
        """Browsers share cookies between the ports of a host: one name per port keeps two daemons apart."""
        return f"petal_token_{self.port}"

    @property
    def base_url(self) -> str:
        """The URL a browser on this machine reaches the API at (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in WILDCARDS else self.host
        return f"http://{_bracketed(host)}:{self.port}"

    @property
    def login_url(self) -> str:
        return f"{self.base_url}/?token={quote(self.token, safe='')}"

    def host_allowed(self, header: str | None) -> bool:
        if not header:
            return False
        name, port = _split_host(header.strip().lower())
        if port != self.port and not (port is None and self.port == 80):
            return False
        if name == _bracketed(self.host):
            return True
        if (_is_loopback(self.host) or self.host in WILDCARDS) and name in LOOPBACK_NAMES:
            return True
        if self.host in WILDCARDS:
            # an IP literal cannot be rebound by DNS; names are this machine's own
            return _is_ip(name) or name in {socket.gethostname().lower(), socket.getfqdn().lower()}
        return False

    def token_matches(self, offered: str | None) -> bool:
        # "replace": a header or query may hold any code point, lone surrogates included
        return offered is not None and hmac.compare_digest(offered.encode(errors="replace"), self.token.encode())

    def offered_token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            return value.strip() if scheme.lower() == "bearer" else None
        return request.cookies.get(self.cookie_name)

    async def check(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The four checks of the module docstring, then the handler."""
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return error_response(
                421,
                "misdirected",
                f"this API answers requests for {self.base_url} only, not for Host {host!r}; use that address",
            )
        origin = request.headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{(host or '').strip().lower()}":
            return error_response(
                403,
                "forbidden",
                f"cross-origin request from {origin[:200]!r} refused: only pages of the API's own origin may use it",
            )
        if request.path == "/" and "token" in request.query and request.method in ("GET", "HEAD"):
            return self.login(request)
        if not self.token_matches(self.offered_token(request)):
            return error_response(
                401,
                "unauthorized",
                "this API needs its token: run `petalctl token` on the daemon's machine, then send "
                "`Authorization: Bearer TOKEN` (an OpenAI client's api_key) or open the login URL it prints",
            )
        writes = request.method not in SAFE_METHODS and (request.method != "DELETE" or request.body_exists)
        if writes and request.content_type not in BODY_TYPES:
            return error_response(
                415,
                "unsupported_media_type",
                f"{request.method} {request.path} takes Content-Type: application/json (or {MSGPACK} for "
                f"tensors), not {request.headers.get('Content-Type', 'none')!r}",
            )
        return await handler(request)

    def login(self, request: web.Request) -> web.StreamResponse:
        """``/?token=TOKEN``: a cookie for this browser, then the same page without the token in the URL."""
        if not self.token_matches(request.query.get("token")):
            return error_response(
                401, "unauthorized", "wrong token in the login URL: run `petalctl token` for the current one"
            )
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(
            self.cookie_name, self.token, max_age=COOKIE_MAX_AGE, path="/", httponly=True, samesite="Strict"
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


@web.middleware
async def guard_tcp(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests over the Unix socket pass; those over TCP go through the app's ``HttpGuard`` (refused without one)."""
    if arrived_on_unix_socket(request):
        return await handler(request)
    guard = request.app.get(GUARD_KEY)
    if not isinstance(guard, HttpGuard):
        return error_response(403, "forbidden", "this daemon serves its API on the Unix socket only")
    return await guard.check(request, handler)


def arrived_on_unix_socket(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


async def get_http_token(request: web.Request) -> web.Response:
    """``GET /v1/http/token``, on the Unix socket only: the TCP API's token and login URL (``petalctl token``)."""
    if not arrived_on_unix_socket(request):
        raise PetalError("not_found", "the token is only served on the daemon's Unix socket: run `petalctl token`")
    guard = request.app.get(GUARD_KEY)
    if not isinstance(guard, HttpGuard):
        raise PetalError(
            "not_found",
            "this daemon serves no TCP API: start it with --http 127.0.0.1:PORT (or http = ... in its config)",
        )
    return web.json_response({"token": guard.token, "url": guard.login_url, "http": guard.base_url})


def add_auth_routes(app: web.Application, config: Config) -> None:
    """The guard for ``config.http`` (token loaded or created now) and the socket-only token endpoint (the login URL
    ``/?token=`` is answered by the guard itself; ``/`` is the dashboard, dashboard.py)."""
    if config.http:
        app[GUARD_KEY] = HttpGuard.from_config(config)
    app.router.add_get("/v1/http/token", get_http_token)


def _split_host(value: str) -> tuple[str, int | None]:
    """``name:port``, ``[v6]:port`` or ``name`` -> (name, brackets kept; port, None without one, -1 if bad)."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        if not rest:
            return name, None
        if not rest.startswith(":"):
            return name, -1
        port = rest[1:]
    else:
        name, sep, port = value.rpartition(":")
        if not sep:
            return value, None
    return name, (int(port) if port.isdigit() and len(port) <= 5 else -1)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
