"""Client side of one server's span of blocks: `info`, `forward`, `backward` and inference sessions over a transport.

Every reply is read with its typed message of `petal.protocol.replies` (the same types the servers send).

What callers (the router and sessions) must catch, and what it means for failover:

- `PetalError` (from `petal.protocol.errors`): the server answered with an error frame. `e.code` says why:
  "busy" (KV budget or queue full: retry later or elsewhere), "max_length", "unknown_block", "wrong_shape",
  "bad_request", "timeout" (the server's own per-request limit), "internal" (a server bug), "unavailable"
  (shutting down). The inference stream stays open after an error frame (the session is still usable).
- `WireError` (a `PetalError` subclass, codes "bad_frame"/"bad_tensor"/"too_large"): the server's error frame says
  our request is malformed or too large, or `check_request_size` refused it before sending (no server can take it):
  the caller's error, never a reason to ban or fail over.
- `PetalError("bad_reply")`: the server's reply could not be read (a faulty server: ban it, fail over).
- `petal.daemon.net.transport.TransportError` and its subclasses `DialError`, `ProtocolNotSupported`, `StreamClosed`,
  `StreamReset`: the server is unreachable, gone, or dropped the stream. Fail over.
- `TimeoutError`: no answer in time. For an inference step the stream is then reset (a late answer could no longer
  be paired with its step) and the `RemoteInference` is closed: open a new one and replay.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from petal.daemon import trace
from petal.daemon.net.transport import MAX_FRAME, PeerAddr, Stream, StreamClosed, Transport
from petal.protocol.adapters import ADAPTER_FIELD
from petal.protocol.errors import PetalError, WireError
from petal.protocol.lora import Lora, decode_lora_grads, encode_lora
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    DEFAULT_CODEC,
    DEFAULT_MAX_TENSOR_BYTES,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
)
from petal.protocol.replies import (
    BackwardReply,
    ForwardReply,
    InfoReply,
    OpenReply,
    PushFailed,
    StepReply,
    decode_reply_tensor,
)
from petal.protocol.tensors import DTYPES, encode_tensor

__all__ = ["RemoteInference", "RemoteSpan", "StepOutput"]

log = logging.getLogger("petal.routing")


FRAME_MARGIN = 1 << 20
"""Room left in a frame for a request's non-tensor fields (model name, addresses, small maps)."""


def _walk(obj: object, tensors: list[dict[str, Any]]) -> int:
    """Bytes of payload in ``obj`` (a request about to be framed); collects its encoded tensors."""
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, dict):
        if "codec" in obj and "shape" in obj and "dtype" in obj:
            tensors.append(obj)
        return sum(_walk(v, tensors) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_walk(v, tensors) for v in obj)
    return 0


def check_request_size(request: dict[str, Any], what: str, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> None:
    """Refuse, before sending, a request no server can take: one over the transport's frame, a tensor over the
    servers' per-tensor limit, or tensors over their per-request total (twice that). Raises PetalError("too_large"),
    the caller's error: it must not count against the server, which never saw the request."""
    tensors: list[dict[str, Any]] = []
    payload = _walk(request, tensors)
    total = 0
    for t in tensors:
        dtype = DTYPES.get(t["dtype"])
        nbytes = math.prod(t["shape"]) * (dtype.itemsize if dtype is not None else 4)
        total += nbytes
        if nbytes > max_tensor_bytes:
            raise PetalError(
                "too_large",
                f"{what}: a tensor of shape {list(t['shape'])} in {t['dtype']} takes {nbytes / 2**20:.1f} MiB, over "
                f"the {max_tensor_bytes / 2**20:.0f} MiB a server accepts per tensor; split the batch or the "
                "sequence into smaller requests",
            )
    if total > 2 * max_tensor_bytes:
        raise PetalError(
            "too_large",
            f"{what}: the request's tensors take {total / 2**20:.1f} MiB, over the {2 * max_tensor_bytes / 2**20:.0f} "
            "MiB a server accepts per request; split the batch or the sequence into smaller requests",
        )
    if payload + FRAME_MARGIN > MAX_FRAME:
        raise PetalError(
            "too_large",
            f"{what}: the request takes {payload / 2**20:.1f} MiB on the wire, over the transport's "
            f"{MAX_FRAME / 2**20:.0f} MiB frame; split the batch or the sequence, or use a smaller codec (q8)",
        )


def _malformed(span: RemoteSpan, raw: object, error: WireError) -> PetalError:
    """What a reply that failed to decode means: the server's own error frame stays what it says (it may be about
    our request); any other reply we cannot read is the server's fault ("bad_reply": fail over, ban it)."""
    frame = raw.get("error") if isinstance(raw, dict) else None
    if isinstance(frame, dict) and set(frame) == {"code", "message"}:
        return error
    return PetalError("bad_reply", f"{span!r} sent a reply that cannot be read ({error}); trying another server")


def _enc(tensor: torch.Tensor | None, codec: str) -> dict[str, Any] | None:
    return None if tensor is None else encode_tensor(tensor.detach(), codec)


def _enc_mask(mask: torch.Tensor | None) -> dict[str, Any] | None:
    return None if mask is None else encode_tensor(mask.detach().to(torch.uint8), "none")


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
        adapter: str | None = None,
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
        self.adapter = adapter  # a server-hosted adapter every request names (petal.protocol.adapters); None: base

    def __repr__(self) -> str:
        return f"RemoteSpan({self.model}[{self.start}:{self.end}] @ {self.peer.peer_id[-8:]})"

    def _header(self) -> dict[str, Any]:
        header = {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "start": self.start,
            "end": self.end,
            "codec": self.codec,
        }
        if self.adapter is not None:
            header[ADAPTER_FIELD] = self.adapter
        return header

    async def info(self, timeout: float = 10.0) -> InfoReply:
        """The server's `info` (span, limits, throughput, cache tokens left, versions)."""
        return InfoReply.from_wire(
            await self.transport.call(self.peer, INFO_PROTOCOL, {"model": self.model}, timeout=timeout)
        )

    def _lora(self, lora: Lora | None) -> tuple[Lora | None, dict[str, Any] | None]:
        """This span's share of ``lora`` and its wire form; weights always travel exactly (codec "none")."""
        sub = None if lora is None else lora.for_blocks(self.start, self.end)
        return sub, None if sub is None else encode_lora(sub, "none")

    async def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
        lora: Lora | None = None,
    ) -> torch.Tensor:
        """The span's output for `hidden` `[B, T, H]` (no cache), in `hidden`'s dtype.

        `lora` may hold weights for any blocks: only those of this span are sent.
        """
        out, _ = await self.forward_keep(hidden, mask, prompts, timeout, lora, keep=False)
        return out

    async def forward_keep(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
        lora: Lora | None = None,
        *,
        keep: bool = True,
    ) -> tuple[torch.Tensor, str | None]:
        """`forward`, asking the server to keep this forward's graph for a backward: (output, the id it is kept
        under, or None when the server did not keep it: a backward then recomputes)."""
        request = {
            **self._header(),
            "hidden": _enc(hidden, self.codec),
            "mask": _enc_mask(mask),
            "prompts": _enc(prompts, self.codec),
        }
        if keep:
            request["keep"] = True
        _, wire_lora = self._lora(lora)
        if wire_lora is not None:
            request["lora"] = wire_lora
        check_request_size(request, f"forward of {self!r}")
        raw = await self.transport.call(self.peer, FORWARD_PROTOCOL, request, timeout=timeout)
        try:
            reply = ForwardReply.from_wire(raw)
            out = decode_reply_tensor(reply.hidden, "hidden", self.max_reply_bytes, shape=tuple(hidden.shape))
        except WireError as e:
            raise _malformed(self, raw, e) from None
        return out.to(hidden.dtype), reply.activation

    async def backward(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
        lora: Lora | None = None,
        activation: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """Gradients w.r.t. the span's input `hidden`, `prompts` and this span's `lora` weights, given `grad` w.r.t.
        its output. The LoRA gradients (None when no weight of `lora` falls in this span) have exactly the sent keys
        and shapes. `activation`: the id of this input's kept forward (`forward_keep`): the server reuses its graph,
        or recomputes from `hidden` when it is gone.
        """
        request = {
            **self._header(),
            "hidden": _enc(hidden, self.codec),
            "grad": _enc(grad, self.codec),
            "mask": _enc_mask(mask),
            "prompts": _enc(prompts, self.codec),
        }
        if activation is not None:
            request["activation"] = activation
        sub, wire_lora = self._lora(lora)
        if wire_lora is not None:
            request["lora"] = wire_lora
        check_request_size(request, f"backward of {self!r}")
        raw = await self.transport.call(self.peer, BACKWARD_PROTOCOL, request, timeout=timeout)
        try:
            return self._backward_reply(raw, hidden, prompts, sub)
        except WireError as e:
            raise _malformed(self, raw, e) from None

    def _backward_reply(
        self, raw: object, hidden: torch.Tensor, prompts: torch.Tensor | None, sub: Lora | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        reply = BackwardReply.from_wire(raw)
        grad_in = decode_reply_tensor(reply.grad, "grad", self.max_reply_bytes, shape=tuple(hidden.shape))
        grad_in = grad_in.to(hidden.dtype)
        grad_prompts = None
        if prompts is not None:
            if reply.grad_prompts is None:
                raise PetalError("internal", "the server sent no grad_prompts although prompts were sent")
            grad_prompts = decode_reply_tensor(
                reply.grad_prompts, "grad_prompts", self.max_reply_bytes, shape=tuple(prompts.shape)
            ).to(prompts.dtype)
        grad_lora = None
        if sub is not None:
            grad_lora = decode_lora_grads(reply.grad_lora, sub, max_bytes=self.max_reply_bytes)
        return grad_in, grad_prompts, grad_lora

    async def open_inference(
        self, max_length: int, batch: int, timeout: float = 30.0, push: bool = False, lora: Lora | None = None
    ) -> RemoteInference:
        """Open a session holding a KV cache of `max_length` tokens for `batch` sequences on the server.

        With `push` the server also accepts this session's inputs pushed by the previous hop; whether it does is
        `RemoteInference.accepts_push` (False for servers that predate push). `lora` may hold weights for any blocks:
        this span's share is sent once, here, and applied by the server to every step. Raises PetalError "busy" if
        the server cannot reserve the cache within its allocation timeout.
        """
        sub, wire_lora = self._lora(lora)
        stream = await self.transport.open_stream(self.peer, INFERENCE_PROTOCOL, timeout=timeout)
        try:
            request: dict[str, Any] = {**self._header(), "max_length": max_length, "batch": batch}
            if push:
                request["push"] = True
            if wire_lora is not None:
                request["lora"] = wire_lora
                check_request_size(request, f"inference open of {self!r}")
            await stream.send(request)
            try:
                raw = await stream.recv(timeout=timeout)
            except StreamClosed:
                raise StreamClosed(f"{self!r} closed the inference stream without answering") from None
            try:
                reply = OpenReply.from_wire(raw)
            except WireError as e:
                raise _malformed(self, raw, e) from None
            if sub is not None and not reply.lora:
                raise PetalError(
                    "bad_reply",
                    f"{self!r} did not confirm the session's LoRA weights (outdated?); trying another server",
                )
        except BaseException:
            await stream.reset()
            raise
        accepts = push and reply.push and reply.session is not None
        return RemoteInference(self, stream, reply.max_length, batch, reply.session, accepts)


@dataclass(frozen=True)
class StepOutput:
    """One reply of an inference stream, decoded: the output, or None if the server skipped a step that waited for a
    push because the client's next message came first; `pushed` says whether the output also went to the next hop."""

    hidden: torch.Tensor | None
    pushed: bool


class RemoteInference:
    """One open inference session on one server. Steps are serialized; use as `async with`.

    `step` is one request and its reply. For push, `send_step` and `recv_step` split it: the caller sends every hop
    its message first and then reads the replies in order (one per message sent); the caller serializes them.
    """

    def __init__(
        self,
        span: RemoteSpan,
        stream: Stream,
        max_length: int,
        batch: int,
        session_id: str | None = None,
        accepts_push: bool = False,
    ) -> None:
        self.span = span
        self.stream = stream
        self.max_length = max_length
        self.batch = batch
        self.session_id = session_id  # the server's id of this session (None from servers that predate push)
        self.accepts_push = accepts_push  # the server takes this session's inputs by push from the previous hop
        self.position = 0  # tokens in the server's cache
        self.closed = False
        self.outstanding = 0  # messages sent whose reply was not read yet
        self._lock = asyncio.Lock()
        self._next: asyncio.Future[object] | None = None  # a read of the next frame already started (`next_frame`)

    def push_target(self) -> dict[str, Any]:
        """Where the previous hop pushes this session's inputs (the `push_to` field of its step message)."""
        if self.session_id is None:
            raise PetalError("bad_request", f"{self.span!r} did not open a push session; step it without push")
        return {"peer": self.span.peer.peer_id, "addrs": list(self.span.peer.addrs), "session": self.session_id}

    async def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        position: int | None = None,
        prompts: torch.Tensor | None = None,
        timeout: float = 60.0,
        reorder: list[int] | None = None,
    ) -> torch.Tensor:
        """Run `t` new tokens `hidden` `[B, t, H]` at cache `position` (default: the end of the cache).

        A `position` below the current one truncates the server's cache first (history replay); `reorder` then
        makes cache row i a copy of row `reorder[i]` (beam search). `mask` is `[B, position + t]`. Returns the output
        `[B, t, H]` in `hidden`'s dtype.
        """
        async with self._lock:
            await self.send_step(hidden, mask, position, prompts, reorder=reorder)
            reply = await self.recv_step(tuple(hidden.shape), hidden.dtype, timeout)
            if reply.hidden is None:
                raise PetalError("internal", f"{self.span!r} skipped a step that carried its input")
            return reply.hidden

    async def send_step(
        self,
        hidden: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        position: int | None = None,
        prompts: torch.Tensor | None = None,
        *,
        step: int | None = None,
        tokens: int | None = None,
        push_from: str | None = None,
        push_to: dict[str, Any] | None = None,
        reorder: list[int] | None = None,
    ) -> None:
        """Send one step message. `hidden=None` with `push_from` (the previous hop's peer id), `step` and `tokens`:
        take the input from that peer's push. `push_to` (another session's `push_target()`): push the output there.
        `reorder`: permute the cache's rows first (see `step`).
        """
        if self.closed:
            raise PetalError("bad_request", f"the inference session on {self.span!r} is closed; open a new one")
        message: dict[str, Any] = {
            "hidden": _enc(hidden, self.span.codec),
            "mask": _enc_mask(mask),
            "position": self.position if position is None else position,
            "prompts": _enc(prompts, self.span.codec),
        }
        if step is not None:
            message["step"] = step
        if hidden is None:
            message.update(push_from=push_from, tokens=tokens)
        if push_to is not None:
            message["push_to"] = push_to
        if reorder is not None:
            message["reorder"] = list(reorder)
        check_request_size(message, f"inference step on {self.span!r}")
        try:
            await self.stream.send(message)
        except StreamClosed:
            self.closed = True
            raise StreamClosed(f"{self.span!r} closed the inference stream") from None
        except BaseException:
            await self._abort()
            raise
        self.outstanding += 1

    async def _recv(self, timeout: float) -> object:
        """The next frame: from the read `next_frame` started, else from the stream."""
        task = self._next
        if task is None:
            return await self.stream.recv(timeout=timeout)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise TimeoutError
        self._next = None
        return task.result()

    def next_frame(self) -> asyncio.Future[object]:
        """The read of this stream's next frame, started now if it was not (the next `recv_step` takes its result)."""
        if self._next is None:
            self._next = asyncio.ensure_future(self.stream.recv())
        return self._next

    async def wait_reply_or_notice(self, previous: RemoteInference, step: int, timeout: float) -> PushFailed | None:
        """Wait until this hop's next reply arrives (None: read it with `recv_step`), or until `previous`, the hop
        that pushed this step's input here, says that push failed (its `PushFailed` notice, consumed: this hop still
        waits for the input, send it). Raises TimeoutError when neither comes within `timeout`."""
        own, deadline = self.next_frame(), time.monotonic() + timeout
        watching: asyncio.Future[object] | None = previous.next_frame()
        while not own.done():
            waiting = {own} if watching is None else {own, watching}
            left = deadline - time.monotonic()
            done, _ = await asyncio.wait(waiting, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
            if not done:
                await self._abort()
                raise TimeoutError(f"inference step on {self.span!r} got no answer within {timeout}s")
            if watching is not None and watching.done() and not own.done():
                raw = None if watching.cancelled() or watching.exception() is not None else watching.result()
                if PushFailed.is_notice(raw):
                    previous._next = None
                    try:
                        notice = PushFailed.from_wire(raw)
                    except PetalError:
                        notice = PushFailed(step, "malformed notice")
                    if notice.step == step:
                        return notice
                watching = None  # another frame (or the stream's end): left for the previous hop's next read
        return None

    async def recv_step(
        self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, timeout: float = 60.0
    ) -> StepOutput:
        """The reply to the oldest unanswered message: its output `shape` in `dtype` (or a skip, see StepOutput).
        `PushFailed` notices of steps already answered are skipped (the session learnt of them while waiting)."""
        try:
            raw = await self._recv(timeout)
            while PushFailed.is_notice(raw):
                log.info("%s: a push the session already recovered from failed: %r", self.span, raw)
                raw = await self._recv(timeout)
            trace.mark("c.got")
        except TimeoutError:
            await self._abort()
            raise TimeoutError(f"inference step on {self.span!r} got no answer within {timeout}s") from None
        except StreamClosed:
            self.closed = True
            raise StreamClosed(f"{self.span!r} closed the inference stream") from None
        except BaseException:
            await self._abort()
            raise
        self.outstanding -= 1
        try:
            reply = StepReply.from_wire(raw)
            self.position = reply.position
            if reply.skipped or reply.hidden is None:
                return StepOutput(None, False)
            out = decode_reply_tensor(reply.hidden, "hidden", self.span.max_reply_bytes, shape=shape)
        except WireError as e:
            raise _malformed(self.span, raw, e) from None
        return StepOutput(out.to(dtype), reply.pushed is True)

    def _drop_read(self) -> None:
        task, self._next = self._next, None
        if task is not None:
            if task.done():
                if not task.cancelled():
                    task.exception()  # retrieved: a closed stream's error is no news here
            else:
                task.cancel()

    async def _abort(self) -> None:
        self.closed = True
        self._drop_read()
        await self.stream.reset()

    async def close(self) -> None:
        """End the session; the server frees its cache. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._drop_read()
        await self.stream.close()

    async def __aenter__(self) -> RemoteInference:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            await self.close()
        else:
            await self._abort()
