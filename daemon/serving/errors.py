"""How serving fails: `ServeError` (bad settings, said before loading), `ComputeTimeout` (a job ran past its time),
and `ErrorReply`, the one place where an exception raised while handling a request becomes an error frame.
"""

from __future__ import annotations

import concurrent.futures
import logging
from types import TracebackType
from typing import Any

from petal.protocol.errors import PetalError
from petal.protocol.messages import error_reply

log = logging.getLogger("petal.server")


class ServeError(RuntimeError):
    """Serving cannot start with these settings; the message says what to change."""


class ComputeTimeout(PetalError):
    """A job did not finish within the request timeout (code "timeout").

    `running` is the job's future when the compute thread is still running it (it could not be cancelled): whoever
    owns memory the job writes (a session's KV cache) must keep it until that future is done.
    """

    def __init__(self, message: str, running: concurrent.futures.Future[Any] | None) -> None:
        super().__init__("timeout", message)
        self.running = running


class ErrorReply:
    """`with ErrorReply("forward request") as out: out.reply = ...`: every failure inside becomes `out.reply`.

    PetalError goes to the client as is (the `parse_*` validators raise nothing else, whatever the input: see
    `petal.protocol.messages.validator`); ValueError and RuntimeError (e.g. a shape the kernels reject that
    validation let through) become "bad_request: the <noun> could not be computed"; MemoryError becomes "too_large";
    anything else is a bug of this server: logged with its traceback and answered "internal". `out.error` keeps the
    PetalError sent. Exceptions of the types in `passing` (and BaseExceptions such as cancellation) propagate
    untouched.
    """

    def __init__(self, what: str, *, noun: str = "request", passing: tuple[type[BaseException], ...] = ()) -> None:
        self.what = what
        self.noun = noun
        self.passing = passing
        self.reply: dict[str, Any] = {}
        self.error: PetalError | None = None

    def __enter__(self) -> ErrorReply:
        return self

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> bool:
        if e is None or isinstance(e, self.passing) or not isinstance(e, Exception):
            return False
        if isinstance(e, PetalError):
            self.error = e
        elif isinstance(e, (ValueError, RuntimeError)):
            log.warning("%s failed: %s", self.what, e)
            self.error = PetalError("bad_request", f"the {self.noun} could not be computed: {e}"[:1000])
        elif isinstance(e, MemoryError):
            log.warning("%s ran out of memory", self.what)
            self.error = PetalError(
                "too_large", f"the {self.noun} needs more memory than this server has free; send less at once"
            )
        else:
            log.error("%s failed unexpectedly", self.what, exc_info=e)
            self.error = PetalError("internal", f"{type(e).__name__}: {e}"[:1000])
        self.reply = error_reply(self.error)
        return True
