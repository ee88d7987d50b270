"""The replies of every block RPC, typed and frozen: what a server sends back and what a client accepts.

Servers build them and send ``to_wire()``; clients turn what they received into one with ``from_wire``, which
re-raises an error frame as the remote ``PetalError`` and raises ``WireError`` ("bad_frame") for a reply that lacks
a field or carries one of the wrong type, as ``messages.check_reply`` does. Tensors stay in their wire form
(``WireTensor``, as ``petal.protocol.tensors.encode_tensor`` makes them) so a server can forward a step's output
to the next hop without re-encoding it; ``decode_reply_tensor`` decodes one and checks its shape.

The wire format (see ``messages``) is:

- info ``{model, fingerprint, family, num_blocks, start, end, hidden_size, dtype, quant, max_length, max_batch,
  cache_tokens_left, throughput, version, codecs, sessions, push}``; only ``start``, ``end`` and ``hidden_size``
  are required from a peer, the rest default when absent.
- forward ``{hidden, activation?}``; backward ``{grad, grad_prompts (tensor or None), grad_lora?}``.
- inference open ``{ok, max_length, session, push}``; step ``{hidden, position, pushed?}`` or
  ``{skipped: true, position}``; push ack ``{ok: true}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import torch

from petal.protocol.errors import PetalError, WireError
from petal.protocol.messages import DEFAULT_MAX_TENSOR_BYTES, SESSION_ID_RE, check_reply
from petal.protocol.tensors import decode_tensor

__all__ = [
    "BackwardReply",
    "ForwardReply",
    "InfoReply",
    "OpenReply",
    "PushAck",
    "StepReply",
    "WireTensor",
    "decode_reply_tensor",
]

WireTensor = dict[str, Any]
"""A tensor in its wire form ``{dtype, shape, codec, data, ...}``; validated when decoded."""


def _bad(what: str, name: str, expected: str) -> WireError:
    return WireError("bad_frame", f"{what} reply: field {name!r} must be {expected}; the server may be incompatible")


def _int(m: dict[str, Any], name: str, what: str, default: int | None = None) -> int:
    value = m.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(what, name, "an integer")
    return value


def _float(m: dict[str, Any], name: str, what: str, default: float) -> float:
    value = m.get(name, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(what, name, "a number")
    return float(value)


def _str(m: dict[str, Any], name: str, what: str, default: str) -> str:
    value = m.get(name, default)
    if not isinstance(value, str):
        raise _bad(what, name, "a string")
    return value


def _bool(m: dict[str, Any], name: str, what: str, default: bool) -> bool:
    value = m.get(name, default)
    if not isinstance(value, bool):
        raise _bad(what, name, "true or false")
    return value


def _tensor(m: dict[str, Any], name: str, what: str, *, optional: bool = False) -> WireTensor | None:
    value = m.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise _bad(what, name, "a tensor map")
    return value


def decode_reply_tensor(
    tensor: WireTensor, name: str, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES, *, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Tensor ``name`` of a reply, checked for the expected shape (a server must not return anything else)."""
    decoded: torch.Tensor = decode_tensor(tensor, max_bytes=max_bytes)
    if shape is not None and tuple(decoded.shape) != tuple(shape):
        raise WireError("bad_tensor", f"reply {name!r} has shape {list(decoded.shape)}, expected {list(shape)}")
    return decoded


@dataclass(frozen=True)
class InfoReply:
    """A server's ``info``: what it hosts, its limits and its load."""

    start: int
    end: int
    hidden_size: int
    model: str = ""
    fingerprint: str = ""
    family: str = ""
    num_blocks: int = 0
    dtype: str = ""
    quant: str = ""
    max_length: int = 0
    max_batch: int = 0
    cache_tokens_left: int = 0
    throughput: float = 0.0
    version: int = 0
    codecs: tuple[str, ...] = ()
    sessions: int = 0
    push: bool = False  # the server takes inference inputs pushed by the previous hop

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "start": self.start,
            "end": self.end,
            "hidden_size": self.hidden_size,
            "dtype": self.dtype,
            "quant": self.quant,
            "max_length": self.max_length,
            "max_batch": self.max_batch,
            "cache_tokens_left": self.cache_tokens_left,
            "throughput": self.throughput,
            "version": self.version,
            "codecs": list(self.codecs),
            "sessions": self.sessions,
            "push": self.push,
        }

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        m = check_reply(msg, "start", "end", "hidden_size")
        w = "info"
        codecs = m.get("codecs", [])
        if not isinstance(codecs, list) or not all(isinstance(c, str) for c in codecs):
            raise _bad(w, "codecs", "a list of strings")
        return cls(
            start=_int(m, "start", w),
            end=_int(m, "end", w),
            hidden_size=_int(m, "hidden_size", w),
            model=_str(m, "model", w, ""),
            fingerprint=_str(m, "fingerprint", w, ""),
            family=_str(m, "family", w, ""),
            num_blocks=_int(m, "num_blocks", w, 0),
            dtype=_str(m, "dtype", w, ""),
            quant=_str(m, "quant", w, ""),
            max_length=_int(m, "max_length", w, 0),
            max_batch=_int(m, "max_batch", w, 0),
            cache_tokens_left=_int(m, "cache_tokens_left", w, 0),
            throughput=_float(m, "throughput", w, 0.0),
            version=_int(m, "version", w, 0),
            codecs=tuple(codecs),
            sessions=_int(m, "sessions", w, 0),
            push=_bool(m, "push", w, False),
        )


@dataclass(frozen=True)
class ForwardReply:
    """A forward call's output: the span's hidden states for the request's input; ``activation``: the id under
    which the server keeps this forward's graph for the backward (asked with ``keep``; None when not kept)."""

    hidden: WireTensor
    activation: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"hidden": self.hidden}
        if self.activation is not None:
            wire["activation"] = self.activation
        return wire

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        m = check_reply(msg, "hidden")
        hidden = _tensor(m, "hidden", "forward")
        assert hidden is not None
        activation = m.get("activation")
        if activation is not None and not (isinstance(activation, str) and SESSION_ID_RE.fullmatch(activation)):
            raise _bad("forward", "activation", "32 hex chars")
        return cls(hidden, activation)


@dataclass(frozen=True)
class BackwardReply:
    """A backward call's gradients: w.r.t. the input, the deep prompts (if sent) and the client's LoRA (if sent)."""

    grad: WireTensor
    grad_prompts: WireTensor | None = None
    grad_lora: dict[str, Any] | None = None  # wire form of `petal.protocol.lora.encode_lora_grads`

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"grad": self.grad, "grad_prompts": self.grad_prompts}
        if self.grad_lora is not None:
            wire["grad_lora"] = self.grad_lora
        return wire

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        m = check_reply(msg, "grad")
        grad = _tensor(m, "grad", "backward")
        assert grad is not None
        grad_lora = m.get("grad_lora")
        if grad_lora is not None and not isinstance(grad_lora, dict):
            raise _bad("backward", "grad_lora", "a map")
        return cls(grad, _tensor(m, "grad_prompts", "backward", optional=True), grad_lora)


@dataclass(frozen=True)
class OpenReply:
    """The answer to an inference stream's first message: the session is open with a cache of ``max_length``.

    ``session`` is the server's id of the session (None from a server that predates push, or one that sent an id
    that is not 32 hex chars: such a session is used without push); ``push``: it takes inputs by push.
    """

    max_length: int
    session: str | None = None
    push: bool = False
    lora: bool = False  # the server applies the LoRA weights sent with the open to every step

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"ok": True, "max_length": self.max_length, "session": self.session, "push": self.push}
        if self.lora:
            wire["lora"] = True
        return wire

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        m = check_reply(msg, "ok", "max_length")
        session = m.get("session")
        if not (isinstance(session, str) and SESSION_ID_RE.fullmatch(session)):
            session = None
        return cls(_int(m, "max_length", "inference open"), session, m.get("push") is True, m.get("lora") is True)


@dataclass(frozen=True)
class StepReply:
    """One inference step's answer: the output and the cache length after it, or a skip.

    ``skipped``: the step waited for a push and the client's next message came first (``hidden`` is None).
    ``pushed``: whether the output also went to the next hop (None when the step asked for no push); it is said once
    the push is sent, before its ack: a `PushFailed` notice follows on the stream if the ack does not come.
    """

    position: int
    hidden: WireTensor | None = None
    pushed: bool | None = None
    skipped: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": True, "position": self.position}
        wire: dict[str, Any] = {"hidden": self.hidden, "position": self.position}
        if self.pushed is not None:
            wire["pushed"] = self.pushed
        return wire

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        m = check_reply(msg, "position")
        position = m["position"]
        if not isinstance(position, int) or isinstance(position, bool):
            # "internal", not "bad_frame": a server that sends this is faulty, and the session fails over from it
            raise PetalError("internal", f"the server sent a non-integer position {position!r:.40}")
        if m.get("skipped") is True:
            return cls(position, skipped=True)
        check_reply(m, "hidden")
        pushed = m.get("pushed")
        return cls(position, _tensor(m, "hidden", "inference step"), pushed if isinstance(pushed, bool) else None)


@dataclass(frozen=True)
class PushFailed:
    """A notice on an inference stream, between replies: the push of `step`'s output (its reply said ``pushed``) was
    not acked by the next hop, so that hop still waits for the step's input and the client must send it itself."""

    step: int
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"push_failed": self.step, "reason": self.reason}

    @staticmethod
    def is_notice(msg: object) -> bool:
        return isinstance(msg, dict) and "push_failed" in msg

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        m = check_reply(msg, "push_failed")
        step, reason = m["push_failed"], m.get("reason", "")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(reason, str):
            raise PetalError("internal", f"the server sent a malformed push_failed notice {msg!r:.80}")
        return cls(step, reason[:500])


@dataclass(frozen=True)
class PushAck:
    """A server's acknowledgement of one pushed step input (failures come as error frames instead)."""

    def to_wire(self) -> dict[str, Any]:
        return {"ok": True}

    @classmethod
    def from_wire(cls, msg: object) -> Self:
        check_reply(msg, "ok")
        return cls()
