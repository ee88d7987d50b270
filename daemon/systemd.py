"""Talking to systemd and the terminal: sd_notify readiness, status and watchdog pings, and readable log lines."""

from __future__ import annotations

import logging
import os
import socket
import sys
from enum import IntEnum

log = logging.getLogger("petal.systemd")


class ExitCode(IntEnum):
    """petald's exit status: one per class of start-up failure, so that scripts and systemd can tell them apart
    (the unit's RestartPreventExitStatus= lists the classes a restart cannot fix). `petald --help` lists them from
    EXIT_CODE_HELP; docs/operations.md has a table of them with examples (tests/unit/daemon/test_systemd.py keeps
    the three in step)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    IN_USE = 3
    STATE = 4
    MODEL = 5
    NETWORK = 6


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "stopped cleanly (SIGTERM or SIGINT)",
    ExitCode.INTERNAL: "an unexpected error, i.e. a bug: --log-level debug shows the traceback",
    ExitCode.USAGE: "a bad flag, config file or setting",
    ExitCode.IN_USE: "a port (--listen, --dht-port, --http) or the control socket is in use, e.g. by another petald",
    ExitCode.STATE: "the state dir, identity key, HTTP token or socket dir cannot be used (permissions, ownership)",
    ExitCode.MODEL: "the model to serve: not found, unreadable, --blocks outside it, no CUDA, cannot be loaded",
    ExitCode.NETWORK: "no initial peer answered, or no DHT peer could be joined",
}


def sd_notify(state: str) -> bool:
    """Send state lines (READY=1, STOPPING=1, STATUS=..., WATCHDOG=1) to systemd; a no-op unless NOTIFY_SOCKET is
    set. Returns whether the datagram went out: a notify socket that is gone is logged, never raised (systemd's
    own sd_notify behaves the same; the daemon must not stop, or hang, because its supervisor stopped listening)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a reader that stopped reading (full queue) must not block the event loop
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.debug("could not notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def watchdog_period() -> float | None:
    """Seconds between `WATCHDOG=1` pings: half of systemd's `WATCHDOG_USEC` (set from the unit's `WatchdogSec=`),
    or None when no watchdog watches this process (unset, 0, no NOTIFY_SOCKET, or WATCHDOG_PID names another
    process, e.g. the parent that started us)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        interval = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return interval / 2e6 if interval > 0 else None


def setup_logging(level: str) -> None:
    """Rich lines in a terminal; plain ones under systemd (which adds its own timestamps) or into a file."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    if sys.stderr.isatty() and not os.environ.get("JOURNAL_STREAM"):
        from rich.logging import RichHandler

        root.addHandler(RichHandler(show_path=False, rich_tracebacks=True))
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
        if not os.environ.get("JOURNAL_STREAM"):
            fmt = "%(asctime)s " + fmt
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    for noisy in ("libp2p", "multiaddr", "kademlia", "rpcudp", "aiohttp.access", "async_service"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    if not os.environ.get("LIBP2P_DEBUG"):  # (with it, libp2p installs handlers of its own)
        _adopt_libp2p_logger(root.level)


def _adopt_libp2p_logger(level: int) -> None:
    """libp2p's import means to silence its logger (propagation off, no handler) but its records then reach stderr
    through logging's last-resort handler as bare, unlabelled lines ("Failed to open TCP stream: ..." on every dead
    dial, or next to petald's own one-line start-up error). Route them through our handler instead: its warnings at
    --log-level debug, only its critical lines otherwise (petald logs what a failure means in its own words)."""
    try:
        import libp2p  # noqa: F401 - imported first, so that its logger setup cannot undo ours afterwards
    except ImportError:
        return
    logger = logging.getLogger("libp2p")
    logger.propagate = True
    logger.setLevel(logging.WARNING if level <= logging.DEBUG else logging.CRITICAL)
