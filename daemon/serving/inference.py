"""The server side of one inference stream (`InferenceSession`): its KV cache, push inbox and pusher, and the loop
that answers the client's steps until it closes, idles out, or a step times out.

Every client message gets exactly one reply, in order. A step without `hidden` waits for its input by push (see
`PushInbox`); if the client's next message arrives first, that step is answered `{"skipped": true}` and the client's
message (its own copy of the input) is served instead, so the client always decides. A step that pushes its output
replies once the push is sent; if the next hop then does not ack it, a `PushFailed` notice follows the reply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from petal.daemon import trace
from petal.daemon.net.transport import Stream, StreamClosed, ThreadSend, thread_sender
from petal.daemon.serving.batching import step_batch
from petal.daemon.serving.compute import SpanCompute
from petal.daemon.serving.errors import ComputeTimeout, ErrorReply
from petal.daemon.serving.kv_pool import Allocation, KVPool
from petal.daemon.serving.push import FAILED, WRITTEN, Pusher, PushInbox
from petal.daemon.serving.settings import ServeSettings
from petal.daemon.serving.worker import INFERENCE, Jobs
from petal.protocol.errors import PetalError
from petal.protocol.messages import OpenRequest, PushTarget, ServedSpan, StepRequest, error_reply, parse_step
from petal.protocol.replies import OpenReply, PushFailed, StepReply

INLINE_MAX_TOKENS = 16
"""Largest step (batch x tokens) the only open session may run on the event loop (`InferenceSession._submit`): a
decode step or a short draft; a prompt's prefill goes to the compute thread, not blocking the loop that long."""

StepJob = concurrent.futures.Future[tuple[StepReply, bool]]
"""A step's compute: its reply, and whether the worker thread already sent it on (see `InferenceSession._compute`)."""


class InferenceSession:
    """One open inference stream; `run` serves it and always gives the cache back (see the module docstring)."""

    def __init__(
        self,
        stream: Stream,
        opened: OpenRequest,
        allocation: Allocation,
        *,
        session_id: str,
        served: ServedSpan,
        settings: ServeSettings,
        compute: SpanCompute,
        jobs: Jobs,
        pool: KVPool,
        pusher: Pusher,
        inbox: PushInbox | None,
        alone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.stream = stream
        self.opened = opened
        self.allocation = allocation
        self.session_id = session_id
        self.served = served
        self.settings = settings
        self.compute = compute
        self.jobs = jobs
        self.pool = pool
        self.pusher = pusher
        self.inbox = inbox
        self.alone = alone  # whether this is the server's only open session (its small steps may run inline)
        self.blocks: list[nn.Module] = compute.blocks(opened.start, opened.end)
        self._reordered_step: int | None = None  # the numbered step whose reorder was applied (applied only once)
        self._pending: object = None  # a client message read while waiting for a push
        self.opened_at = self.last_active = time.monotonic()  # last_active: when the last reply went out
        self.waiting_for_client = False  # between replies: waiting for the client's next message
        self._evicted: PetalError | None = None
        self._evict = asyncio.Event()
        self._running: concurrent.futures.Future[Any] | None = None  # a timed-out job the thread still runs
        self._abandoned = False  # a step timed out: the worker must not send its late result
        self._reply_sender = thread_sender(stream)  # None: replies go out from this task (libp2p streams)
        self._unacked: tuple[PushTarget, int] | None = None  # the push the last reply announced, its ack not yet read

    @property
    def cache_length(self) -> int:
        return self.allocation.cache.length

    @property
    def owner(self) -> str:
        """The peer this session's cache was allocated for."""
        return self.allocation.owner

    def idle_for(self) -> float:
        """Seconds since the last reply while waiting for the client's next message (0 while a step runs)."""
        return time.monotonic() - self.last_active if self.waiting_for_client else 0.0

    def evict(self, error: PetalError) -> None:
        """Close this session at its next wait for the client (at once if idle): `error` goes to the client as an
        error frame, then the stream ends and the cache is freed. The client fails over, replaying its history."""
        if self._evicted is None:
            self._evicted = error
            self._evict.set()

    async def run(self) -> None:
        """Acknowledge the open, then one reply per client message; frees the cache (once no job uses it)."""
        opened = self.opened
        try:
            ack = OpenReply(opened.max_length, self.session_id, opened.push, lora=opened.lora is not None)
            await self.stream.send(ack.to_wire())
            while (msg := await self._next_message()) is not None:
                sent = False
                with ErrorReply("inference step", noun="step", passing=(StreamClosed,)) as out:
                    trace.mark("srv.step")
                    reply, sent = await self._step(msg)
                    out.reply = reply.to_wire()
                if isinstance(out.error, ComputeTimeout):  # the cache may be mid-write: end the session
                    self._running = out.error.running
                    self._abandoned = True  # a late result of the worker is not sent
                    await self.stream.send(out.reply)
                    return
                if not sent:
                    await self.stream.send(out.reply)
                trace.mark("srv.replied")
                await self._check_ack()
                self.last_active = time.monotonic()
        except StreamClosed:
            return
        finally:
            await self.pusher.close()
            self._free()

    async def _next_message(self) -> object | None:
        """The next client message (one read while waiting for a push first); None once the session is over."""
        if self._pending is not None:
            msg, self._pending = self._pending, None
            return msg
        if self._evicted is not None:
            await self.stream.send(error_reply(self._evicted))
            return None
        recv = asyncio.ensure_future(self.stream.recv(timeout=self.settings.idle_timeout))
        evicted = asyncio.ensure_future(self._evict.wait())
        self.waiting_for_client = True
        try:
            await asyncio.wait({recv, evicted}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting_for_client = False
            for task in (recv, evicted):
                if not task.done():
                    task.cancel()
            await asyncio.gather(recv, evicted, return_exceptions=True)  # none left pending or unretrieved
        if recv.cancelled():  # evicted while idle
            assert self._evicted is not None
            await self.stream.send(error_reply(self._evicted))
            return None
        try:
            return recv.result()
        except StreamClosed:
            return None
        except TimeoutError:
            timeout = self.settings.idle_timeout
            error = PetalError("timeout", f"no step for {timeout:.0f}s: session closed, cache freed")
            await self.stream.send(error_reply(error))
            return None

    def _submit(self, step: StepRequest) -> StepJob:
        """Queue the step's compute. Where the stream allows (`thread_sender`), the worker sends the result on itself:
        the reply to the client when the step pushes nowhere, else the push to the next hop (over a push stream
        already open); the output leaves this server without waking this task first (one hand-off per hop).

        The server's only open session runs a small step (<= `INLINE_MAX_TOKENS` rows) right here on the event loop
        when the compute thread is idle (`settings.inline_steps`): no hand-off at all, the output written as soon as
        it is computed. With other sessions open, steps go to the thread, where concurrent ones batch."""
        if step.reorder is not None and step.step is not None:
            if step.step == self._reordered_step:  # the client resent a step already run: its rows are in order
                step = replace(step, reorder=None)
            else:
                self._reordered_step = step.step
        send = None
        if step.push_to is None:
            send = self._send_reply if self._reply_sender is not None else None
        elif step.step is not None:
            push = self.pusher.thread_sender(step.push_to)
            if push is not None:
                send = functools.partial(self._send_push, push, step.push_to.session, step.step)
        opened = self.opened
        batch = step_batch(  # continuous batching: this step may run in one forward with other sessions' steps
            self.compute,
            self.blocks,
            step,
            self.allocation.cache,
            opened.codec,
            functools.partial(self._compute, step, send),
            lora=opened.lora,
            first=opened.start,
        )
        assert step.hidden is not None
        inline = (
            self.settings.inline_steps
            and step.hidden.shape[0] * step.hidden.shape[1] <= INLINE_MAX_TOKENS
            and self.alone()
        )
        job = self.jobs.submit(INFERENCE, self._compute, step, send, batch=batch, inline=inline)
        trace.mark("srv.submitted")
        return job

    def _compute(
        self, step: StepRequest, send: Callable[[StepReply], None] | None, reply: StepReply | None = None
    ) -> tuple[StepReply, bool]:
        """Runs in the worker thread: the step's reply (`reply` when a batch computed it already), sent on by `send`
        when given (True if so)."""
        opened = self.opened
        if reply is None:
            reply = self.compute.step(self.blocks, step, self.allocation.cache, opened.codec, opened.lora, opened.start)
        if send is None or self._abandoned:
            return reply, False
        send(reply)
        return reply, True

    def _send_reply(self, reply: StepReply) -> None:
        assert self._reply_sender is not None
        self._reply_sender(reply.to_wire())

    @staticmethod
    def _send_push(push: ThreadSend, session: str, step: int, reply: StepReply) -> None:
        push({"session": session, "step": step, "hidden": reply.hidden})

    async def _step(self, msg: object) -> tuple[StepReply, bool]:
        """One step's reply and whether it was sent already; raises PetalError (or StreamClosed when the client left
        while its step waited)."""
        opened = self.opened
        step = parse_step(
            msg,
            self.served,
            blocks=len(self.blocks),
            batch=opened.batch,
            max_length=opened.max_length,
            length=self.cache_length,
        )
        job: StepJob | None = None
        if step.hidden is None:
            hidden, self._pending, job = await self._await_push(step)
            if hidden is None:
                return StepReply(self.cache_length, skipped=True), False
            step = replace(step, hidden=hidden)
        if self.inbox is not None and step.step is not None:
            self.inbox.taken(step.step)
        if job is None:
            job = self._submit(step)
        reply, sent = await self.jobs.finish(job)
        trace.mark("srv.resumed")
        if step.push_to is not None:
            assert step.step is not None
            assert reply.hidden is not None  # a computed step always has its output
            done = await self.pusher.send(step.push_to, step.step, reply.hidden, sent=sent)
            if done == WRITTEN:  # its ack is read once the reply is out (`_check_ack`)
                self._unacked = (step.push_to, step.step)
            trace.mark("srv.pushed")
            return replace(reply, pushed=done != FAILED), False
        return reply, sent

    async def _check_ack(self) -> None:
        """Read the ack of the push the last reply announced; if it does not come, tell the client (`PushFailed`)
        so that it sends the next hop that step's input itself (the next hop is waiting for it)."""
        if self._unacked is None:
            return
        target, step = self._unacked
        self._unacked = None
        reason = await self.pusher.acked(target, step)
        if reason is not None:
            await self.stream.send(PushFailed(step, reason).to_wire())

    async def _await_push(self, step: StepRequest) -> tuple[torch.Tensor | None, object, StepJob | None]:
        """The pushed input of `step` and its job, or (None, message, None) when the client's next message comes first.

        The step's compute is submitted the moment the push is accepted (inside the push handler, before the ack goes
        out), so the hop-to-hop latency does not include waking this task. The job is None if submitting failed (the
        caller then submits again and reports the error). Raises StreamClosed when the client goes away,
        PetalError("timeout") after `request_timeout` without either.
        """
        inbox = self.inbox
        if inbox is None:
            raise PetalError(
                "bad_request",
                "this session was opened without push: send 'hidden' with every step, or open with push: true",
            )
        assert step.step is not None and step.push_from is not None
        number = step.step
        started: asyncio.Future[tuple[torch.Tensor, StepJob | None]] = asyncio.get_running_loop().create_future()

        def arrived(pushed: int) -> None:
            hidden = inbox.take(pushed)
            if hidden is None or started.done():
                return
            try:
                job: StepJob | None = self._submit(replace(step, hidden=hidden))
            except PetalError:  # busy or stopping: the caller submits again and answers with the error
                job = None
            started.set_result((hidden, job))

        inbox.expect(number, step.tokens, step.push_from, on_arrival=arrived)
        recv = asyncio.ensure_future(self.stream.recv())
        changed: asyncio.Future[None] | None = None
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            while True:
                if started.done():  # the push came first and its compute is already queued
                    hidden, job = started.result()
                    return hidden, None, job
                if recv.done():
                    return None, recv.result(), None
                taken = inbox.take(number)
                if taken is not None:
                    return taken, None, None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PetalError(
                        "timeout",
                        f"no push for step {number} from {step.push_from} within "
                        f"{self.settings.request_timeout:.0f}s; send the step's hidden states yourself",
                    )
                changed = asyncio.ensure_future(inbox.changed())
                waiting: set[asyncio.Future[Any]] = {recv, changed, started}
                await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        finally:
            inbox.expect(None)
            for task in (recv, changed):  # also when this session is cancelled: no task left pending or unread
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    def _free(self) -> None:
        """Give the cache back now, or once the thread lets go of it if a timed-out job still runs."""
        running = self._running
        if running is not None and not running.done():
            loop = asyncio.get_running_loop()
            running.add_done_callback(lambda _: loop.call_soon_threadsafe(self.pool.free, self.allocation))
        else:
            self.pool.free(self.allocation)
