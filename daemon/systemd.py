"""Talking to systemd and the terminal: sd_notify readiness and readable log lines."""

from __future__ import annotations

import logging
import os
import socket
import sys


def sd_notify(state: str) -> bool:
    """Send a state line (READY=1, STOPPING=1, STATUS=...) to systemd; a no-op unless NOTIFY_SOCKET is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


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
