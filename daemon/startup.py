"""Why petald did not start: ``StartupError`` with its exit code, and the probes that sort a failure into a class
(an address in use, no permission, not this machine's; a live control socket; an unusable state dir or key)."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

from petal.daemon.config import Config
from petal.daemon.identity import Identity, IdentityError
from petal.daemon.systemd import ExitCode


class StartupError(RuntimeError):
    """The node could not start; the message says what to change, `code` which class of failure it is."""

    def __init__(self, message: str, code: ExitCode = ExitCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


def load_identity(config: Config) -> Identity:
    """The node's key from the state dir, or a StartupError (ExitCode.STATE) that says what to fix."""
    try:
        return Identity.load_or_create(config.state_dir)
    except IdentityError as e:
        raise StartupError(str(e), ExitCode.STATE) from e
    except OSError as e:
        where = e.filename or config.state_dir
        raise StartupError(
            f"cannot use the state dir {config.state_dir} ({where}: {e.strerror or e}): make it a directory this user "
            "can write, or pass --state-dir elsewhere",
            ExitCode.STATE,
        ) from e


def bind_error(what: str, e: OSError, flag: str) -> StartupError:
    """A StartupError for an address we could not listen on, its exit code chosen by the errno."""
    if e.errno == errno.EADDRINUSE:
        return StartupError(
            f"{what} is in use (by another petald?): stop that program or choose another {flag}", ExitCode.IN_USE
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return StartupError(
            f"no permission to listen on {what} ({e.strerror}): ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            f"choose a port of 1024 or more with {flag}",
            ExitCode.STATE,
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"cannot listen on {what}: that address is not one of this machine's; use 0.0.0.0 or a local address "
            f"in {flag}",
            ExitCode.USAGE,
        )
    return StartupError(f"cannot listen on {what} ({e.strerror or e}): check {flag}", ExitCode.USAGE)


def probe_bind(host: str, port: int, kind: int = socket.SOCK_STREAM) -> OSError | None:
    """Bind (host, port) as a listener would (SO_REUSEADDR, like trio and aiohttp) and let go: the error, if any.

    libp2p logs why it could not listen instead of raising it; this finds the errno (EADDRINUSE, ...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=kind)
    except OSError as e:
        return e
    family, _, _, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as e:
        return e
    return None


def is_ip(host: str, proto: str) -> bool:
    """Whether `host` is an address of the multiaddr protocol `proto` (/dns names are left to the resolver)."""
    if proto not in ("ip4", "ip6"):
        return True
    try:
        return ipaddress.ip_address(host).version == int(proto[-1])
    except ValueError:
        return False


def unix_socket_alive(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(path))
    except OSError:
        return False
    return True
