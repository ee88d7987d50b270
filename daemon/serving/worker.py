"""The compute thread (`ComputeWorker`) and the server's door to it (`Jobs`).

All of a server's compute runs in ONE thread fed by a bounded priority queue: inference steps jump ahead of
forward/backward work, and a full queue answers "busy" instead of piling up latency. torch releases the GIL, so the
event loop (and the libp2p thread) stay responsive while blocks run. Jobs that may share a forward (concurrent
sessions' steps over the same blocks, like forward calls) are taken together and run as one batch (`batching.py`).

A small inference step may instead run on the caller's thread (`submit(..., inline=True)`, the event loop) when the
worker is idle and nothing waits: no thread hand-off on the way in, none on the way out. The caller decides when
that is worth blocking its loop (see `InferenceSession._submit`); the worker only guarantees that one job computes
at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from petal.daemon.serving.errors import ComputeTimeout
from petal.protocol.errors import PetalError

if TYPE_CHECKING:
    from petal.daemon.serving.batching import Batch

T = TypeVar("T")
INFERENCE, TRAINING = 0, 1  # worker priorities: lower runs first


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    future: concurrent.futures.Future[Any] | None = field(compare=False)
    fn: Callable[..., Any] | None = field(compare=False)
    args: tuple[object, ...] = field(compare=False)
    batch: Batch | None = field(default=None, compare=False)


def _unavailable() -> PetalError:
    return PetalError("unavailable", "this server is shutting down; use another one")


class ComputeWorker:
    """One thread running jobs by priority (then arrival); `submit` raises "busy" when `max_queue` jobs wait.

    Continuous batching (`petal.daemon.serving.batching`): a job submitted with a `Batch` takes along every queued
    job of its priority with an equal key, in arrival order, while their tokens fit `max_batch_tokens` (<= 1: off).
    """

    def __init__(self, max_queue: int, name: str = "petal-compute", max_batch_tokens: int = 0) -> None:
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self._heap: list[_Job] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self.batches = [0, 0]  # batches of 2 jobs or more run, per priority
        self.batched = [0, 0]  # jobs run inside those batches, per priority
        self.largest = [0, 0]  # most jobs in one batch, per priority
        self.inline = 0  # jobs run on the submitting thread (`run_inline`)
        self._busy = False  # a job computes now (on the worker thread or inline)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        self._thread.start()

    def submit(
        self, priority: int, fn: Callable[..., T], *args: object, batch: Batch | None = None
    ) -> concurrent.futures.Future[T]:
        if self._stopped:
            raise _unavailable()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if len(self._heap) >= self.max_queue:
                raise PetalError("busy", f"{self.max_queue} requests are already queued here; retry later or elsewhere")
            heapq.heappush(self._heap, _Job(priority, next(self._seq), future, fn, args, batch))
            self._cond.notify()
        return future

    def run_inline(self, fn: Callable[..., T], *args: object) -> concurrent.futures.Future[T] | None:
        """`fn(*args)` run now on the calling thread, as a done future, if the worker is idle and no job waits;
        else None (nothing run: submit it)."""
        with self._cond:
            if self._stopped or self._busy or self._heap:
                return None
            self._busy = True
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting handler
            future.set_exception(e)
        finally:
            with self._cond:
                self._busy = False
                self.inline += 1
                if self._heap:  # a job queued meanwhile waits for _busy; else waking the thread only costs the hop
                    self._cond.notify()
        return future

    def _next(self) -> list[_Job]:
        """The next job, with the queued jobs that batch with it (see the class docstring)."""
        with self._cond:
            while not self._heap or self._busy:
                self._cond.wait()
            self._busy = True
            job = heapq.heappop(self._heap)
            if job.batch is None or job.future is None or self.max_batch_tokens <= 1 or not self._heap:
                return [job]
            key, tokens, taken = job.batch.key, job.batch.tokens, [job]
            for other in sorted(self._heap):
                if tokens >= self.max_batch_tokens or other.priority != job.priority:
                    break
                b, f = other.batch, other.future
                if b is None or f is None or f.cancelled() or b.key != key:
                    continue
                if tokens + b.tokens <= self.max_batch_tokens:
                    taken.append(other)
                    tokens += b.tokens
            if len(taken) > 1:
                chosen = {id(j) for j in taken}
                self._heap = [j for j in self._heap if id(j) not in chosen]
                heapq.heapify(self._heap)
            return taken

    def _run(self) -> None:
        while True:
            group = self._next()
            first = group[0]
            if first.future is None or first.fn is None:
                return
            running = [j for j in group if j.future is not None and j.future.set_running_or_notify_cancel()]
            try:
                if len(running) == 1:
                    self._run_one(running[0])
                elif running:
                    self._run_batch(running)
            finally:
                with self._cond:
                    self._busy = False

    @staticmethod
    def _run_one(job: _Job) -> None:
        assert job.future is not None and job.fn is not None
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting handler
            job.future.set_exception(e)

    def _run_batch(self, jobs: list[_Job]) -> None:
        assert jobs[0].batch is not None
        items = [j.batch.item for j in jobs if j.batch is not None]
        try:
            outcomes = jobs[0].batch.run(items)
        except BaseException as e:  # noqa: BLE001 - the whole batch failed: every handler hears it
            outcomes = [e] * len(jobs)
        priority = jobs[0].priority
        self.batches[priority] += 1
        self.batched[priority] += len(jobs)
        self.largest[priority] = max(self.largest[priority], len(jobs))
        for job, outcome in zip(jobs, outcomes, strict=True):
            assert job.future is not None
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def stop(self) -> None:
        """Cancel queued jobs, let the running one finish, end the thread."""
        self._stopped = True
        with self._cond:
            for item in self._heap:
                if item.future is not None:
                    item.future.cancel()
            self._heap = [_Job(-1, -1, None, None, ())]
            self._cond.notify()
        self._thread.join(timeout=60)


class Jobs:
    """A server's compute: closed until `start` and from the moment its server begins stopping; every job is bounded
    by `timeout` seconds, queueing included."""

    def __init__(self, max_queue: int, timeout: float, name: str = "petal-compute", max_batch_tokens: int = 0) -> None:
        self.max_queue = max_queue
        self.timeout = timeout
        self.name = name
        self.max_batch_tokens = max_batch_tokens  # continuous batching's budget (batching.py); <= 1: off
        self._worker: ComputeWorker | None = None
        self._open = False
        self.submitted = [0, 0]  # jobs accepted per priority (INFERENCE steps, TRAINING calls), for /metrics

    @property
    def open(self) -> bool:
        return self._open

    def start(self) -> None:
        self._worker = ComputeWorker(self.max_queue, name=self.name, max_batch_tokens=self.max_batch_tokens)
        self._open = True

    def close(self) -> None:
        """Refuse new jobs ("unavailable"); queued and running ones go on until `stop`."""
        self._open = False

    async def stop(self) -> None:
        """Refuse new jobs, cancel the queued ones, wait for the running one, end the thread."""
        self._open = False
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop)

    def batch_stats(self) -> dict[str, int]:
        """Continuous batching so far (JSON-able, for status and /metrics): batches of 2 jobs or more, the jobs
        they held, and the largest, for inference steps and for forward/backward calls."""
        w = self._worker
        stats = {"max_batch_tokens": self.max_batch_tokens}
        for priority, kind in ((INFERENCE, "step"), (TRAINING, "training")):
            stats[f"{kind}_batches"] = 0 if w is None else w.batches[priority]
            stats[f"{kind}_batched_jobs"] = 0 if w is None else w.batched[priority]
            stats[f"{kind}_largest_batch"] = 0 if w is None else w.largest[priority]
        stats["inline_steps"] = 0 if w is None else w.inline
        return stats

    def submit(
        self, priority: int, fn: Callable[..., T], *args: object, batch: Batch | None = None, inline: bool = False
    ) -> concurrent.futures.Future[T]:
        """Queue `fn(*args)` (with `batch`: it may run together with queued jobs of the same key, see
        `petal.daemon.serving.batching`); raises PetalError "unavailable" when closed, "busy" when the queue is full.
        With `inline`, it runs at once on this thread instead if the worker is idle and nothing waits (the future
        comes back done)."""
        if not self._open or self._worker is None:
            raise _unavailable()
        if inline and (done := self._worker.run_inline(fn, *args)) is not None:
            self.submitted[priority] += 1
            return done
        future = self._worker.submit(priority, fn, *args, batch=batch)
        self.submitted[priority] += 1
        time.sleep(0)  # let go of the GIL now, so the woken worker starts at once, not when this loop next idles
        return future

    async def finish(self, future: concurrent.futures.Future[T]) -> T:
        """The job's result within `timeout`, or ComputeTimeout (holding the job if the thread still runs it)."""
        if future.done():  # ran inline: no loop turn to carry the result over
            return future.result()
        wrapped = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({wrapped}, timeout=self.timeout)
        if not done:
            raise ComputeTimeout(
                f"the request did not finish within {self.timeout:.0f}s on this server; retry elsewhere",
                None if future.cancel() else future,
            )
        return wrapped.result()

    async def run(self, priority: int, fn: Callable[..., T], *args: object, batch: Batch | None = None) -> T:
        """`submit` then `finish`."""
        return await self.finish(self.submit(priority, fn, *args, batch=batch))
