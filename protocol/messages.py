"""The block-serving messages (info, forward, backward, inference) and their validators.

Every request a server receives passes through one of the `parse_*` functions before anything touches it: they
check field presence and types, ranges, and tensor shapes against what the server hosts (`ServedSpan`), and raise
`WireError` (malformed) or `PetalError` (well-formed but unservable) with a message that says what to fix. The
client-side `check_reply` does the same for answers (the typed replies of `petal.protocol.replies` build on it).
Pure functions: no I/O, no model.

The inference stream, with push (paper §3.2; every client message gets exactly one reply, in order):

- open ``{model, fingerprint, start, end, max_length, batch, codec, push?, lora?}`` ->
  ``{ok, max_length, session, push, lora?}``: ``session`` is the server's random 128-bit id of this session; ``push:
  true`` in the reply means the server takes this session's inputs by push (only sessions opened with ``push: true``
  do). ``lora`` (client-owned LoRA weights of blocks inside [start, end), as ``petal.protocol.lora``) is applied to
  every step of the session and forgotten when it ends; the reply's ``lora: true`` confirms it.
- step ``{hidden, mask?, position?, prompts?, step?, push_to?, reorder?}`` -> ``{hidden, position, pushed?}``.
  ``reorder`` (a list of ``batch`` row indices, beam search) first replaces cache row ``i`` with row ``reorder[i]``
  (a gather: indices may repeat); a step numbered ``step`` applies it once even if the client sends it twice. With
  ``push_to: {peer, addrs, session}`` (and a ``step`` number) the server also sends its output, encoded exactly as in
  the reply, to that session on the next hop and says in ``pushed`` whether the next hop acknowledged it.
- a step without ``hidden`` but with ``push_from`` (the previous hop's peer id), ``step`` and ``tokens`` takes its
  input from that peer's push. If the client's next message arrives before the push, the waiting step is answered
  ``{skipped: true, position}`` and the new message (the client's own copy of the input) is served instead.
- ``/petal/block/push/1``: a stream of ``{session, step, hidden}`` frames between servers, each answered ``{ok: true}``
  or an error frame (unknown session, step already run, wrong shape or sender, more than a few buffered).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar

import torch

from petal.protocol.errors import PetalError, WireError
from petal.protocol.lora import Lora, parse_lora
from petal.protocol.tensors import all_finite, decode_tensor

INFO_PROTOCOL: Final = "/petal/block/info/1"
FORWARD_PROTOCOL: Final = "/petal/block/forward/1"
BACKWARD_PROTOCOL: Final = "/petal/block/backward/1"
INFERENCE_PROTOCOL: Final = "/petal/block/inference/1"
PUSH_PROTOCOL: Final = "/petal/block/push/1"
"""Server to server: one step's output sent straight to the next hop's inference session (paper §3.2)."""

CODECS: Final[tuple[str, ...]] = ("none", "float16", "bfloat16", "q8")
DEFAULT_CODEC: Final = "q8"
"""The codec a server replies in when a request names none (kept for wire compatibility; petal's own clients always
name one: the daemon's choice, ``AUTO_CODEC`` unless set, resolved per hop by the router)."""
AUTO_CODEC: Final = "auto"
"""Not a wire codec but a choice of one per hop: ``LOSSLESS_CODEC`` on fast links, ``SLOW_LINK_CODEC`` on links measured
slower than the daemon's threshold (``petal.daemon.routing.router.auto_codec``). The daemon's default."""
LOSSLESS_CODEC: Final = "none"
"""Exact float32 on the wire: greedy generation through the swarm equals a local run token for token."""
SLOW_LINK_CODEC: Final = "q8"
"""Blockwise 8-bit (about 4x fewer bytes than float32): what ``auto`` picks on slow links."""
CODEC_CHOICES: Final[tuple[str, ...]] = (AUTO_CODEC, *CODECS)
"""What a daemon, a socket request or ``petalctl --codec`` may ask for."""
DEFAULT_MAX_TENSOR_BYTES: Final = 48 * 1024 * 1024
"""Decoded size limit of one tensor; below the transport's 64 MiB frame so a legal request always fits a frame."""

_MAX_NAME = 256
_MAX_ADDRS = 16
SESSION_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
"""Server-side inference session ids: 128 random bits as hex, so a push cannot guess its way into a session."""


@dataclass(frozen=True)
class ServedSpan:
    """What a server hosts and allows: the facts every request is validated against."""

    model: str
    fingerprint: str
    start: int
    end: int
    hidden_size: int
    max_batch: int
    max_length: int
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    max_request_bytes: int = 2 * DEFAULT_MAX_TENSOR_BYTES


@dataclass(frozen=True)
class ForwardRequest:
    """A validated forward or backward call; `grad` is set only for backward."""

    start: int
    end: int
    hidden: torch.Tensor
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    codec: str
    grad: torch.Tensor | None = None
    lora: Lora | None = None
    keep: bool = False  # forward: keep the graph for a backward; the reply names it (`activation`)
    activation: str | None = None  # backward: the kept graph of the forward it follows (recomputed when gone)


@dataclass(frozen=True)
class OpenRequest:
    """A validated first message of an inference stream."""

    start: int
    end: int
    max_length: int
    batch: int
    codec: str
    push: bool = False  # the client will send this session's inputs by push from the previous hop
    lora: Lora | None = None  # client-owned LoRA applied to every step of the session


@dataclass(frozen=True)
class PushTarget:
    """Where a server pushes a step's output: the next hop's peer (and how to dial it) and its session id there."""

    peer: str
    addrs: tuple[str, ...]
    session: str


@dataclass(frozen=True)
class StepRequest:
    """A validated inference step: `tokens` new tokens written at cache `position`.

    `hidden` is None when the input comes by push from peer `push_from` (the previous hop) as step number `step`;
    `push_to`, when set, asks the server to push its output on to the next hop.
    """

    hidden: torch.Tensor | None
    mask: torch.Tensor | None
    position: int
    prompts: torch.Tensor | None
    tokens: int = 0
    step: int | None = None
    push_from: str | None = None
    push_to: PushTarget | None = None
    reorder: tuple[int, ...] | None = None  # cache row i becomes row reorder[i] before the step (beam search)


@dataclass(frozen=True)
class PushRequest:
    """A validated push: the input of step `step` of inference session `session` on the receiving server."""

    session: str
    step: int
    hidden: torch.Tensor


_P = ParamSpec("_P")
_R = TypeVar("_R")


def validator(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Make a `parse_*` raise only PetalError: whatever else fails while it reads hostile input (a TypeError,
    OverflowError or KeyError on a field of the wrong kind, a MemoryError on an absurd size, ...) becomes
    WireError("bad_frame"), or WireError("too_large") for MemoryError, naming the request and the cause.

    The class of bug this closes: a validator that misses one malformed shape must still answer the caller's
    mistake as the caller's, never as the server's "internal" error.
    """

    def wrap(parse: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(parse)
        def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return parse(*args, **kwargs)
            except PetalError:
                raise
            except MemoryError:
                raise WireError(
                    "too_large", f"{what}: a declared size is too large to allocate; send smaller tensors"
                ) from None
            except Exception as e:  # noqa: BLE001 - hostile input: any failure to read it is the sender's fault
                detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                raise WireError("bad_frame", f"{what}: malformed request ({detail:.300})") from None

        return checked

    return wrap


# --- field helpers -------------------------------------------------------------------------------------------------


def _message(msg: object, what: str) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise WireError("bad_frame", f"a {what} message must be a map, got {type(msg).__name__}")
    return msg


def _int(msg: dict[str, Any], name: str, what: str, *, low: int | None = None, high: int | None = None) -> int:
    value = msg.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError("bad_frame", f"{what}: field {name!r} must be an integer, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise PetalError("bad_request", f"{what}: {name}={value} is outside {bounds}")
    return value


def _str(msg: dict[str, Any], name: str, what: str) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        raise WireError("bad_frame", f"{what}: field {name!r} must be a non-empty string of at most {_MAX_NAME} chars")
    return value


def _codec(msg: dict[str, Any], what: str) -> str:
    codec: object = msg.get("codec", DEFAULT_CODEC)
    if codec is None:
        codec = DEFAULT_CODEC
    if not isinstance(codec, str) or codec not in CODECS:
        raise PetalError("bad_request", f"{what}: unknown reply codec {codec!r:.40}; use one of {', '.join(CODECS)}")
    return codec


def _tensor(msg: dict[str, Any], name: str, served: ServedSpan, *, optional: bool) -> torch.Tensor | None:
    obj = msg.get(name)
    if obj is None:
        if optional:
            return None
        raise WireError("bad_frame", f"field {name!r} (a tensor) is missing")
    tensor: torch.Tensor = decode_tensor(obj, max_bytes=served.max_tensor_bytes)
    return tensor


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_model(msg: dict[str, Any], served: ServedSpan, what: str) -> None:
    model = _str(msg, "model", what)
    if model != served.model:
        raise PetalError("unknown_block", f"{what}: this server hosts model {served.model!r}, not {model!r:.80}")
    fingerprint = msg.get("fingerprint")
    if fingerprint is not None and fingerprint != served.fingerprint:
        raise PetalError(
            "unknown_block",
            f"{what}: model {served.model!r} here has fingerprint {served.fingerprint}, not {fingerprint!r:.40}: "
            "the weights differ; pick a server announcing your fingerprint",
        )


def _span(msg: dict[str, Any], served: ServedSpan, what: str) -> tuple[int, int]:
    start = _int(msg, "start", what)
    end = _int(msg, "end", what)
    if not served.start <= start < end <= served.end:
        raise PetalError(
            "unknown_block",
            f"{what}: blocks [{start}, {end}) are not inside the span [{served.start}, {served.end}) this server hosts",
        )
    return start, end


def _check_hidden(hidden: torch.Tensor, served: ServedSpan, name: str = "hidden") -> tuple[int, int]:
    if not hidden.is_floating_point():
        raise WireError("bad_tensor", f"{name} must be a floating-point tensor, got {hidden.dtype}")
    if hidden.dim() != 3 or hidden.shape[-1] != served.hidden_size:
        raise PetalError(
            "wrong_shape", f"{name} must be [batch, tokens, {served.hidden_size}], got {list(hidden.shape)}"
        )
    batch, t = int(hidden.shape[0]), int(hidden.shape[1])
    if not 1 <= batch <= served.max_batch:
        raise PetalError("wrong_shape", f"{name}: batch {batch} is outside [1, max_batch={served.max_batch}]")
    if t < 1:
        raise PetalError("wrong_shape", f"{name} has no tokens; send at least one")
    if not all_finite(hidden):
        raise WireError("bad_tensor", f"{name} contains NaN or infinite values (or values too large to sum)")
    return batch, t


def _check_mask(mask: torch.Tensor | None, batch: int, total: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dim() != 2 or tuple(mask.shape) != (batch, total):
        raise PetalError(
            "wrong_shape", f"mask must be [batch, past + new tokens] = [{batch}, {total}], got {list(mask.shape)}"
        )
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise WireError("bad_tensor", "mask contains NaN or infinite values")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise PetalError("bad_request", "mask must contain only 0 (padding) and 1 (real token)")
    return mask.to(torch.long)


def _check_prompts(
    prompts: torch.Tensor | None, blocks: int, batch: int, served: ServedSpan, max_prompt: int | None
) -> torch.Tensor | None:
    if prompts is None:
        return None
    if not prompts.is_floating_point():
        raise WireError("bad_tensor", f"prompts must be a floating-point tensor, got {prompts.dtype}")
    shape = list(prompts.shape)
    if (
        prompts.dim() != 4
        or shape[0] != blocks
        or shape[1] not in (1, batch)
        or shape[2] < 1
        or shape[3] != served.hidden_size
    ):
        raise PetalError(
            "wrong_shape",
            f"prompts must be [blocks={blocks}, batch={batch} (or 1), prompt_len, {served.hidden_size}], got {shape}",
        )
    if max_prompt is not None and shape[2] > max_prompt:
        raise PetalError("wrong_shape", f"prompts are {shape[2]} tokens long but only {max_prompt} tokens were sent")
    if not all_finite(prompts):
        raise WireError("bad_tensor", "prompts contain NaN or infinite values (or values too large to sum)")
    return prompts


def _check_total(served: ServedSpan, *tensors: torch.Tensor | None) -> None:
    total = _nbytes(*tensors)
    if total > served.max_request_bytes:
        raise WireError(
            "too_large",
            f"request tensors take {total} bytes, over this server's {served.max_request_bytes}; split the batch",
        )


# --- requests (server side) ----------------------------------------------------------------------------------------


@validator("info request")
def parse_info_request(msg: object, served: ServedSpan) -> None:
    """`{"model": name}`; raises if the server does not host that model."""
    _check_model(_message(msg, "info"), served, "info")


@validator("forward/backward request")
def parse_forward(msg: object, served: ServedSpan, *, backward: bool = False) -> ForwardRequest:
    """A forward (or, with `backward`, a backward) call, fully validated against `served`."""
    what = "backward" if backward else "forward"
    m = _message(msg, what)
    _check_model(m, served, what)
    start, end = _span(m, served, what)
    codec = _codec(m, what)
    hidden = _tensor(m, "hidden", served, optional=False)
    assert hidden is not None
    batch, t = _check_hidden(hidden, served)
    if t > served.max_length:
        raise PetalError("max_length", f"{what}: {t} tokens exceed this server's max_length {served.max_length}")
    mask = _check_mask(_tensor(m, "mask", served, optional=True), batch, t)
    prompts = _check_prompts(_tensor(m, "prompts", served, optional=True), end - start, batch, served, t)
    grad = None
    if backward:
        grad = _tensor(m, "grad", served, optional=False)
        assert grad is not None
        _check_hidden(grad, served, "grad")
        if grad.shape != hidden.shape:
            raise PetalError(
                "wrong_shape", f"grad {list(grad.shape)} must have the shape of hidden {list(hidden.shape)}"
            )
    lora = _check_lora(m.get("lora"), start, end, served, what)
    _check_total(served, hidden, mask, prompts, grad, *(lora.weights.values() if lora is not None else ()))
    keep = m.get("keep", False)
    if not isinstance(keep, bool):
        raise WireError("bad_frame", f"{what}: 'keep' must be true or false")
    activation = m.get("activation")
    if activation is not None and (not isinstance(activation, str) or not SESSION_ID_RE.fullmatch(activation)):
        raise WireError("bad_frame", f"{what}: 'activation' must be the 32 hex chars id a forward with keep returned")
    return ForwardRequest(start, end, hidden, mask, prompts, codec, grad, lora, keep and not backward, activation)


def _check_lora(obj: object, start: int, end: int, served: ServedSpan, what: str) -> Lora | None:
    """The request's client-owned LoRA (None if absent), with every block inside the request's [start, end)."""
    if obj is None:
        return None
    lora = parse_lora(obj, max_bytes=served.max_tensor_bytes)
    outside = [b for b in lora.blocks if not start <= b < end]
    if outside:
        raise PetalError(
            "bad_request",
            f"{what}: lora has weights for block(s) {outside[:5]} outside this request's blocks [{start}, {end}); "
            "send each server only its blocks' weights (Lora.for_blocks)",
        )
    return lora


@validator("inference open")
def parse_open(msg: object, served: ServedSpan) -> OpenRequest:
    """The first message of an inference stream."""
    m = _message(msg, "inference open")
    _check_model(m, served, "inference open")
    start, end = _span(m, served, "inference open")
    max_length = _int(m, "max_length", "inference open", low=1)
    if max_length > served.max_length:
        raise PetalError(
            "max_length", f"max_length {max_length} exceeds this server's limit {served.max_length}; ask for less"
        )
    batch = _int(m, "batch", "inference open", low=1)
    if batch > served.max_batch:
        raise PetalError("wrong_shape", f"batch {batch} exceeds this server's max_batch {served.max_batch}")
    push = m.get("push", False)
    if not isinstance(push, bool):
        raise WireError("bad_frame", "inference open: 'push' must be true or false")
    lora = _check_lora(m.get("lora"), start, end, served, "inference open")
    return OpenRequest(start, end, max_length, batch, _codec(m, "inference open"), push, lora)


def _push_target(obj: object) -> PushTarget | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise WireError("bad_frame", "inference step: 'push_to' must be a map {peer, addrs, session}")
    peer = _str(obj, "peer", "inference step push_to")
    session = obj.get("session")
    if not isinstance(session, str) or not SESSION_ID_RE.fullmatch(session):
        raise WireError(
            "bad_frame",
            "inference step: push_to.session must be 32 lowercase hex chars (the id the "
            "next hop returned when its session was opened)",
        )
    addrs = obj.get("addrs", [])
    if (
        not isinstance(addrs, list)
        or len(addrs) > _MAX_ADDRS
        or not all(isinstance(a, str) and 0 < len(a) <= _MAX_NAME for a in addrs)
    ):
        raise WireError(
            "bad_frame", f"inference step: push_to.addrs must be a list of at most {_MAX_ADDRS} multiaddr strings"
        )
    return PushTarget(peer, tuple(addrs), session)


@validator("inference step")
def parse_step(
    msg: object, served: ServedSpan, *, blocks: int, batch: int, max_length: int, length: int
) -> StepRequest:
    """One inference step of a session opened with `batch` and `max_length` whose cache holds `length` tokens.

    Without `hidden` the message must name `push_from` (the peer whose push carries the input), `step` and
    `tokens`; the pushed tensor is checked against them with `check_pushed`.
    """
    m = _message(msg, "inference step")
    step_no = m.get("step")
    if step_no is not None and (not isinstance(step_no, int) or isinstance(step_no, bool) or step_no < 0):
        raise WireError("bad_frame", "inference step: 'step' must be a non-negative integer")
    push_from = m.get("push_from")
    push_to = _push_target(m.get("push_to"))
    if push_to is not None and step_no is None:
        raise WireError("bad_frame", "inference step: 'push_to' needs a 'step' number to tag the push with")
    hidden = None
    if m.get("hidden") is None and push_from is not None:
        push_from = _str(m, "push_from", "inference step")
        if step_no is None:
            raise WireError("bad_frame", "inference step: a step that waits for a push needs a 'step' number")
        t = _int(m, "tokens", "inference step", low=1, high=max_length)
    else:
        push_from = None
        hidden = _tensor(m, "hidden", served, optional=False)
        assert hidden is not None
        got_batch, t = _check_hidden(hidden, served)
        if got_batch != batch:
            raise PetalError("wrong_shape", f"this session was opened with batch {batch}, the step has {got_batch}")
    position = m.get("position", length)
    if position is None:
        position = length
    if not isinstance(position, int) or isinstance(position, bool):
        raise WireError("bad_frame", f"inference step: 'position' must be an integer, got {type(position).__name__}")
    if not 0 <= position <= length:
        raise PetalError(
            "bad_request",
            f"inference step: position {position} is outside [0, {length}] (the cache holds {length} tokens)",
        )
    if position + t > max_length:
        raise PetalError(
            "max_length",
            f"{position} cached + {t} new tokens exceed the session's max_length {max_length}; "
            "open a new session with a larger max_length",
        )
    mask = _check_mask(_tensor(m, "mask", served, optional=True), batch, position + t)
    prompts = _check_prompts(_tensor(m, "prompts", served, optional=True), blocks, batch, served, None)
    _check_total(served, hidden, mask, prompts)
    reorder = check_reorder(m.get("reorder"), batch)
    return StepRequest(hidden, mask, position, prompts, t, step_no, push_from, push_to, reorder)


def check_reorder(obj: object, batch: int, what: str = "inference step") -> tuple[int, ...] | None:
    """A step's ``reorder``: exactly ``batch`` row indices in [0, batch), or None when absent; PetalError
    ("bad_request") otherwise. Servers and the daemon's socket check it alike."""
    if obj is None:
        return None
    if (
        not isinstance(obj, list | tuple)
        or len(obj) != batch
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < batch for i in obj)
    ):
        raise PetalError(
            "bad_request",
            f"{what}: 'reorder' must be a list of {batch} row indices in [0, {batch}) (the session's batch), "
            f"got {str(obj)[:80]}",
        )
    return tuple(obj)


@validator("push")
def parse_push(msg: object, served: ServedSpan) -> PushRequest:
    """A push frame `{session, step, hidden}`: well-formed, within the limits; fit to the session via `check_pushed`."""
    m = _message(msg, "push")
    session = m.get("session")
    if not isinstance(session, str) or not SESSION_ID_RE.fullmatch(session):
        raise WireError("bad_frame", "push: 'session' must be 32 lowercase hex chars")
    step_no = _int(m, "step", "push", low=0)
    hidden = _tensor(m, "hidden", served, optional=False)
    assert hidden is not None
    _, t = _check_hidden(hidden, served)
    if t > served.max_length:
        raise PetalError("max_length", f"push: {t} tokens exceed this server's max_length {served.max_length}")
    _check_total(served, hidden)
    return PushRequest(session, step_no, hidden)


def check_pushed(hidden: torch.Tensor, batch: int, tokens: int) -> None:
    """Whether a pushed input fits the step that waits for it: `[batch, tokens, hidden]`."""
    if tuple(hidden.shape[:2]) != (batch, tokens):
        raise PetalError(
            "wrong_shape",
            f"push: the step waits for [batch={batch}, tokens={tokens}, hidden], got {list(hidden.shape)}",
        )


# --- error frames and reply checks (the typed replies are in `petal.protocol.replies`) ------------------------


def error_reply(error: PetalError) -> dict[str, Any]:
    """The error frame every handler sends instead of a result."""
    return {"error": error.to_wire()}


def check_reply(msg: object, *fields: str) -> dict[str, Any]:
    """A reply map with `fields` present; raises the remote PetalError if it is an error frame."""
    if isinstance(msg, dict) and "error" in msg:
        raise PetalError.from_wire(msg["error"])
    m = _message(msg, "reply")
    missing = [f for f in fields if f not in m]
    if missing:
        raise WireError("bad_frame", f"reply lacks field(s) {', '.join(missing)}; the server may be incompatible")
    return m
