"""What inference sessions and forward/backward calls share: which failures are the server's (fail over) and which
the caller's (re-raise), the retry budget and the error when it runs out, and the checks of the caller's tensors."""

from __future__ import annotations

import torch

from petal.daemon.net.transport import TransportError
from petal.daemon.routing.chains import Hop
from petal.protocol.errors import PetalError

CALLER_ERROR_CODES = frozenset({"max_length", "bad_request", "wrong_shape", "bad_frame", "bad_tensor", "too_large"})
"""Errors caused by the request itself: another server would refuse it too, so they reach the caller unchanged."""
DEFAULT_MAX_RETRIES = 5
"""Server failures one call (one step, one forward, one backward) survives before it gives up."""


def is_server_fault(error: BaseException) -> bool:
    """Whether ``error`` means "this server failed" (fail over) rather than "this request is wrong" (re-raise)."""
    if isinstance(error, PetalError):
        return error.code not in CALLER_ERROR_CODES
    return isinstance(error, (TransportError, TimeoutError, ConnectionError, OSError, EOFError))


def gave_up(what: str, attempts: int, error: BaseException) -> PetalError:
    """The error a call raises once its retry budget is spent."""
    return PetalError(
        "unavailable",
        f"{what} failed on {attempts} server(s) in a row; last error: {error}. The swarm may be short of healthy "
        "servers for these blocks: retry later, or check `petalctl` swarm status.",
    )


def check_hidden(hidden: torch.Tensor, batch: int | None = None) -> None:
    """Refuse hidden states that are not ``[batch, tokens >= 1, hidden]`` before anything is sent."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise PetalError(
            "wrong_shape",
            f"hidden states must be a [batch, tokens, hidden] tensor, got {getattr(hidden, 'shape', hidden)!r}",
        )
    if batch is not None and hidden.shape[0] != batch:
        raise PetalError(
            "wrong_shape", f"this session was opened for batch {batch}, got hidden states of batch {hidden.shape[0]}"
        )
    if hidden.shape[1] < 1:
        raise PetalError("wrong_shape", "hidden states hold no tokens")


def slice_prompts(prompts: torch.Tensor | None, offset: int, hop: Hop) -> torch.Tensor | None:
    """The deep prompts of ``hop``'s blocks, from prompts laid out for blocks [offset, ...)."""
    return None if prompts is None else prompts[hop.start - offset : hop.end - offset]
