"""The asyncio <-> trio bridge of the libp2p transport: ``Bridge``, two non-blocking hand-offs and a task runner.

py-libp2p is trio-native and runs in its own thread; the daemon is asyncio. Per-message
``trio.from_thread.run`` from executor threads costs far more than the network itself, so both directions are
non-blocking hand-offs instead: asyncio -> trio through ``TrioToken.run_sync_soon`` (which spawns a task or
feeds a per-stream trio channel), trio -> asyncio through ``loop.call_soon_threadsafe`` (resolving a future
or feeding a stream's asyncio queue). Cancelling an asyncio awaiter cancels the trio operation it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from petal.daemon.net.transport import TransportError

__all__ = ["Bridge"]

T = TypeVar("T")


class Bridge:
    """The two hand-offs between the asyncio loop and the trio thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None

    def to_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Run the sync `fn(*args)` soon in the trio thread (FIFO with other calls); never blocks."""
        if self.token is None:
            raise TransportError("the libp2p transport is not running: call start() first")
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise TransportError("the libp2p transport has stopped") from None

    def to_asyncio(self, fn: Callable[..., object], *args: object) -> None:
        """Run the sync `fn(*args)` soon in the asyncio loop; a closed loop means nobody is listening."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def run(
        self, fn: Callable[..., Awaitable[T]], *args: object, discard: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """Run the trio coroutine `fn(*args)` as a task of the transport's nursery; the future gets its outcome.

        Cancelling the future cancels the trio task. If the task produced a result nobody will take (the
        future was cancelled meanwhile), `discard(result)` runs in the trio thread so nothing leaks.
        """
        fut: asyncio.Future[T] = self.loop.create_future()
        scope = trio.CancelScope()

        def deliver(value: T) -> None:
            if not fut.done():
                fut.set_result(value)
            elif discard is not None:
                self.to_trio_quiet(discard, value)

        def fail(error: BaseException) -> None:
            if not fut.done():
                fut.set_exception(error)

        async def task() -> None:
            delivered = False
            try:
                with scope:
                    try:
                        value = await fn(*args)
                    except Exception as e:  # noqa: BLE001 - handed to the asyncio side
                        self.to_asyncio(fail, e)
                    else:
                        self.to_asyncio(deliver, value)
                    delivered = True
            finally:
                if not delivered:
                    self.to_asyncio(fail, TransportError("the operation was cancelled (transport stopping)"))

        def spawn() -> None:
            if self.nursery is None:
                self.to_asyncio(fail, TransportError("the libp2p transport has stopped"))
            else:
                self.nursery.start_soon(task)

        def on_done(f: asyncio.Future[T]) -> None:
            if f.cancelled():
                self.to_trio_quiet(scope.cancel)

        self.to_trio(spawn)
        fut.add_done_callback(on_done)
        return fut

    def to_trio_quiet(self, fn: Callable[..., object], *args: object) -> None:
        """`to_trio`, for clean-up that may race the transport's stop: a stopped transport has nothing left to clean."""
        with contextlib.suppress(TransportError):
            self.to_trio(fn, *args)
