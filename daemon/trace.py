"""Step tracing for benchmarks: a timestamp at each hand-off on a request's path, off unless ``PETAL_TRACE`` is set.

``mark(event)`` records ``(time.monotonic_ns(), event)`` in memory when the environment variable ``PETAL_TRACE``
names a directory; at exit the records go to ``DIR/<pid>.trace``, one ``NS EVENT`` line each. Linux's
CLOCK_MONOTONIC is the same clock in every process, so the traces of all daemons on one machine line up:
``tests/benchmarks/bench_fast_path.py --budget`` reads them to show where the milliseconds of one step go.
Off (the default), ``mark`` is one global lookup and a call; nothing is recorded.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

__all__ = ["ENV", "enabled", "flush", "mark"]

ENV = "PETAL_TRACE"
MAX_EVENTS = 2_000_000
"""Records kept per process (~100 MB at most); later marks are dropped."""

_dir = os.environ.get(ENV) or None
_events: list[tuple[int, str]] | None = [] if _dir else None


def enabled() -> bool:
    return _events is not None


def mark(event: str) -> None:
    """Record that ``event`` happens now (a no-op unless tracing is on). Safe from any thread (list.append)."""
    if _events is not None and len(_events) < MAX_EVENTS:
        _events.append((time.monotonic_ns(), event))


def flush() -> None:
    """Append what was recorded to ``$PETAL_TRACE/<pid>.trace`` and start over (also runs at exit)."""
    global _events
    if _events is None or _dir is None or not _events:
        return
    events, _events = _events, []
    path = Path(_dir) / f"{os.getpid()}.trace"
    with path.open("a") as f:
        f.writelines(f"{ns} {event}\n" for ns, event in events)


if _events is not None:
    atexit.register(flush)
