"""Client side of one server's span of blocks: `info`, `forward`, `backward` and inference sessions over a transport.

What callers (the router and sessions) must catch, and what it means for failover:

- `PetalError` (from `petal.protocol.errors`): the server answered with an error frame. `e.code` says why:
  "busy" (KV budget or queue full: retry later or elsewhere), "max_length", "unknown_block", "wrong_shape",
  "bad_request", "timeout" (the server's own per-request limit), "internal" (a server bug), "unavailable"
  (shutting down). The inference stream stays open after an error frame (the session is still usable).
- `WireError` (a `PetalError` subclass, codes "bad_frame"/"bad_tensor"/"too_large"): our request was rejected as
  malformed, or the server's reply was malformed (a faulty server: ban it).
- `petal.daemon.transport.TransportError` and its subclasses `DialError`, `ProtocolNotSupported`, `StreamClosed`,
  `StreamReset`: the server is unreachable, gone, or dropped the stream. Fail over.
- `TimeoutError`: no answer in time. For an inference step the stream is then reset (a late answer could no longer
  be paired with its step) and the `RemoteInference` is closed: open a new one and replay.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    DEFAULT_CODEC,
    DEFAULT_MAX_TENSOR_BYTES,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    check_reply,
    decode_reply_tensor,
)
from petal.protocol.tensors import encode_tensor

from .transport import PeerAddr, Stream, StreamClosed, Transport

__all__ = ["RemoteInference", "RemoteSpan"]


def _enc(tensor: torch.Tensor | None, codec: str) -> dict[str, Any] | None:
    return None if tensor is None else encode_tensor(tensor.detach(), codec)


def _enc_mask(mask: torch.Tensor | None) -> dict[str, Any] | None:
    return None if mask is None else encode_tensor(mask.detach().to(torch.int8), "none")


class RemoteSpan:
    """Blocks `[start, end)` of `model` as served by `peer`; stateless, cheap to create, safe to share."""

    def __init__(
        self,
        transport: Transport,
        peer: PeerAddr,
        model: str,
        fingerprint: str,
        start: int,
        end: int,
        codec: str = DEFAULT_CODEC,
        max_reply_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    ) -> None:
        if not 0 <= start < end:
            raise ValueError(f"span [{start}, {end}) is empty or negative")
        self.transport = transport
        self.peer = peer
        self.model = model
        self.fingerprint = fingerprint
        self.start = start
        self.end = end
        self.codec = codec
        self.max_reply_bytes = max_reply_bytes

    def __repr__(self) -> str:
        return f"RemoteSpan({self.model}[{self.start}:{self.end}] @ {self.peer.peer_id[-8:]})"

    def _header(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "start": self.start,
            "end": self.end,
            "codec": self.codec,
        }

    async def info(self, timeout: float = 10.0) -> dict[str, Any]:
        """The server's `info` map (span, limits, throughput, cache tokens left, versions)."""
        reply = await self.transport.call(self.peer, INFO_PROTOCOL, {"model": self.model}, timeout=timeout)
        return check_reply(reply, "start", "end", "hidden_size")

    async def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
    ) -> torch.Tensor:
        """The span's output for `hidden` `[B, T, H]` (no cache), in `hidden`'s dtype."""
        request = {**self._header(), "hidden": _enc(hidden, self.codec), "mask": _enc_mask(mask),
                   "prompts": _enc(prompts, self.codec)}
        reply = check_reply(await self.transport.call(self.peer, FORWARD_PROTOCOL, request, timeout=timeout), "hidden")
        out = decode_reply_tensor(reply, "hidden", self.max_reply_bytes, shape=tuple(hidden.shape))
        return out.to(hidden.dtype)

    async def backward(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients w.r.t. the span's input `hidden` (and w.r.t. `prompts` if given), given `grad` w.r.t. its output."""
        request = {**self._header(), "hidden": _enc(hidden, self.codec), "grad": _enc(grad, self.codec),
                   "mask": _enc_mask(mask), "prompts": _enc(prompts, self.codec)}
        reply = check_reply(await self.transport.call(self.peer, BACKWARD_PROTOCOL, request, timeout=timeout), "grad")
        grad_in = decode_reply_tensor(reply, "grad", self.max_reply_bytes, shape=tuple(hidden.shape)).to(hidden.dtype)
        grad_prompts = None
        if prompts is not None:
            if reply.get("grad_prompts") is None:
                raise PetalError("internal", "the server sent no grad_prompts although prompts were sent")
            grad_prompts = decode_reply_tensor(
                reply, "grad_prompts", self.max_reply_bytes, shape=tuple(prompts.shape)
            ).to(prompts.dtype)
        return grad_in, grad_prompts

    async def open_inference(self, max_length: int, batch: int, timeout: float = 30.0) -> RemoteInference:
        """Open a session holding a KV cache of `max_length` tokens for `batch` sequences on the server.

        Raises PetalError "busy" if the server cannot reserve the cache within its allocation timeout.
        """
        stream = await self.transport.open_stream(self.peer, INFERENCE_PROTOCOL, timeout=timeout)
        try:
            await stream.send({**self._header(), "max_length": max_length, "batch": batch})
            try:
                reply = check_reply(await stream.recv(timeout=timeout), "ok", "max_length")
            except StreamClosed:
                raise StreamClosed(f"{self!r} closed the inference stream without answering") from None
        except BaseException:
            await stream.reset()
            raise
        return RemoteInference(self, stream, int(reply["max_length"]), batch)


class RemoteInference:
    """One open inference session on one server. Steps are serialized; use as `async with`."""

    def __init__(self, span: RemoteSpan, stream: Stream, max_length: int, batch: int) -> None:
        self.span = span
        self.stream = stream
        self.max_length = max_length
        self.batch = batch
        self.position = 0  # tokens in the server's cache
        self.closed = False
        self._lock = asyncio.Lock()

    async def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        position: int | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
    ) -> torch.Tensor:
        """Run `t` new tokens `hidden` `[B, t, H]` at cache `position` (default: the end of the cache).

        A `position` below the current one truncates the server's cache first (history replay). `mask` is
        `[B, position + t]`. Returns the output `[B, t, H]` in `hidden`'s dtype.
        """
        if self.closed:
            raise PetalError("bad_request", f"the inference session on {self.span!r} is closed; open a new one")
        async with self._lock:
            message = {
                "hidden": _enc(hidden, self.span.codec),
                "mask": _enc_mask(mask),
                "position": self.position if position is None else position,
                "prompts": _enc(prompts, self.span.codec),
            }
            try:
                await self.stream.send(message)
                raw = await self.stream.recv(timeout=timeout)
            except TimeoutError:
                await self._abort()
                raise TimeoutError(f"inference step on {self.span!r} got no answer within {timeout}s") from None
            except StreamClosed:
                self.closed = True
                raise StreamClosed(f"{self.span!r} closed the inference stream") from None
            except BaseException:
                await self._abort()
                raise
            reply = check_reply(raw, "hidden", "position")
            out = decode_reply_tensor(reply, "hidden", self.span.max_reply_bytes, shape=tuple(hidden.shape))
            new_position = reply["position"]
            if not isinstance(new_position, int) or isinstance(new_position, bool):
                raise PetalError("internal", f"the server sent a non-integer position {new_position!r:.40}")
            self.position = new_position
            return out.to(hidden.dtype)

    async def _abort(self) -> None:
        self.closed = True
        await self.stream.reset()

    async def close(self) -> None:
        """End the session; the server frees its cache. Idempotent."""
        if self.closed:
            return
        self.closed = True
        await self.stream.close()

    async def __aenter__(self) -> RemoteInference:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await self.close()
        else:
            await self._abort()
