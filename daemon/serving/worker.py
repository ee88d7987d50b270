"""The compute thread (`ComputeWorker`) and the server's door to it (`Jobs`).

All of a server's compute runs in ONE thread fed by a bounded priority queue: inference steps jump ahead of
forward/backward work, and a full queue answers "busy" instead of piling up latency. torch releases the GIL, so the
event loop (and the libp2p thread) stay responsive while blocks run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from petal.daemon.serving.errors import ComputeTimeout
from petal.protocol.errors import PetalError

T = TypeVar("T")
INFERENCE, TRAINING = 0, 1  # worker priorities: lower runs first

_Job = tuple[int, int, "concurrent.futures.Future[Any] | None", "Callable[..., Any] | None", tuple[object, ...]]


def _unavailable() -> PetalError:
    return PetalError("unavailable", "this server is shutting down; use another one")


class ComputeWorker:
    """One thread running jobs by priority (then arrival); `submit` raises "busy" when `max_queue` jobs wait."""

    def __init__(self, max_queue: int, name: str = "petal-compute") -> None:
        self.max_queue = max_queue
        self._queue: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        if self._stopped:
            raise _unavailable()
        if self._queue.qsize() >= self.max_queue:
            raise PetalError("busy", f"{self.max_queue} requests are already queued here; retry later or elsewhere")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((priority, next(self._seq), future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None or fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting handler
                future.set_exception(e)

    def stop(self) -> None:
        """Cancel queued jobs, let the running one finish, end the thread."""
        self._stopped = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item[2] is not None:
                item[2].cancel()
        self._queue.put((-1, -1, None, None, ()))
        self._thread.join(timeout=60)


class Jobs:
    """A server's compute: closed until `start` and from the moment its server begins stopping; every job is bounded
    by `timeout` seconds, queueing included."""

    def __init__(self, max_queue: int, timeout: float, name: str = "petal-compute") -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self.name = name
        self._worker: ComputeWorker | None = None
        self._open = False
        self.submitted = [0, 0]  # jobs accepted per priority (INFERENCE steps, TRAINING calls), for /metrics

    @property
    def open(self) -> bool:
        return self._open

    def start(self) -> None:
        self._worker = ComputeWorker(self.max_queue, name=self.name)
        self._open = True

    def close(self) -> None:
        """Refuse new jobs ("unavailable"); queued and running ones go on until `stop`."""
        self._open = False

    async def stop(self) -> None:
        """Refuse new jobs, cancel the queued ones, wait for the running one, end the thread."""
        self._open = False
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop)

    def submit(self, priority: int, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T]:
        """Queue `fn(*args)`; raises PetalError "unavailable" when closed, "busy" when the queue is full."""
        if not self._open or self._worker is None:
            raise _unavailable()
        future = self._worker.submit(priority, fn, *args)
        self.submitted[priority] += 1
        time.sleep(0)  # let go of the GIL now, so the woken worker starts at once, not when this loop next idles
        return future

    async def finish(self, future: concurrent.futures.Future[T]) -> T:
        """The job's result within `timeout`, or ComputeTimeout (holding the job if the thread still runs it)."""
        wrapped = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({wrapped}, timeout=self.timeout)
        if not done:
            raise ComputeTimeout(
                f"the request did not finish within {self.timeout:.0f}s on this server; retry elsewhere",
                None if future.cancel() else future,
            )
        return wrapped.result()

    async def run(self, priority: int, fn: Callable[..., T], *args: object) -> T:
        """`submit` then `finish`."""
        return await self.finish(self.submit(priority, fn, *args))
