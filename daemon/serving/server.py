"""The block server: hosts a span of one model's blocks and serves info, forward, backward and inference over libp2p.

Shape of the thing (paper §2.1, §3.2):
- The KV budget (tokens x blocks) is one tensor reserved at start (`KVPool`), so hours of serving never end in an
  out-of-memory; sessions carve their caches out of it or wait `alloc_timeout`, then get "busy".
- All compute runs in ONE worker thread fed by a bounded priority queue (`ComputeWorker`): inference steps jump
  ahead of forward/backward work, and a full queue answers "busy" instead of piling up latency. torch releases the
  GIL, so the event loop (and the libp2p thread) stay responsive while blocks run.
- Every request goes through `petal.protocol.messages` validators first; every failure becomes an error frame and
  the server goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import os
import platform
import queue
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from petal.daemon.net.transport import PeerAddr, Stream, StreamClosed, TransportError
from petal.kernels.lora import apply_lora
from petal.protocol import PROTOCOL_VERSION
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora, encode_lora_grads
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    CODECS,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    PUSH_PROTOCOL,
    ForwardRequest,
    PushRequest,
    PushTarget,
    ServedSpan,
    StepRequest,
    check_pushed,
    check_reply,
    error_reply,
    parse_forward,
    parse_info_request,
    parse_open,
    parse_push,
    parse_step,
)
from petal.protocol.records import MODELS_KEY, OFFLINE, ModelRecord, RecordError, ServerRecord, block_key
from petal.protocol.tensors import decode_tensor, encode_tensor

log = logging.getLogger("petal.server")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INFERENCE, TRAINING = 0, 1  # worker priorities: lower runs first
FIRST_MESSAGE_TIMEOUT = 30.0  # a caller that opens a stream must say what it wants within this
DEFAULT_CACHE_TOKENS_PER_BLOCK = 4096


class ServeError(RuntimeError):
    """Serving cannot start with these settings; the message says what to change."""


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one block server (from Config; defaults suit tests)."""

    dtype: str = "float32"
    device: str = "cpu"
    quant: str = "none"
    max_batch: int = 8
    max_length: int = 4096
    max_cache_tokens: int | None = None  # tokens x blocks; None: DEFAULT_CACHE_TOKENS_PER_BLOCK per hosted block
    codec: str = "q8"
    alloc_timeout: float = 10.0
    idle_timeout: float = 600.0  # an inference session with no step for this long is closed and its cache freed
    request_timeout: float = 300.0  # longest a forward/backward/step may queue + run
    max_queue: int = 64
    refresh_period: float = 30.0  # how often to re-announce when the free KV budget changed noticeably


# --- span choice -----------------------------------------------------------------------------------------------------


def parse_blocks(text: str, total: int) -> tuple[int, int]:
    """`"A:B"` -> (A, B), checked against the model's `total` blocks."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ServeError(f"--blocks {text!r}: use START:END, e.g. 0:10") from None
    if not 0 <= a < b <= total:
        raise ServeError(f"--blocks {text!r}: the model has blocks 0..{total - 1}; choose START < END <= {total}")
    return a, b


def block_throughputs(entries_by_block: Mapping[int, Sequence[Any]], total: int, exclude_peer: str = "") -> list[float]:
    """Swarm throughput per block: the sum over servers announcing it (offline and malformed entries skipped)."""
    out = [0.0] * total
    for block, entries in entries_by_block.items():
        if not 0 <= block < total:
            continue
        for entry in entries:
            value = getattr(entry, "value", entry)
            peer = getattr(entry, "peer_id", "")
            if exclude_peer and peer == exclude_peer:
                continue
            try:
                record = ServerRecord.from_value(value, peer)
            except (RecordError, TypeError, AttributeError):
                continue
            if record.state != OFFLINE and record.throughput > 0:
                out[block] += record.throughput
    return out


def choose_span(entries_by_block: Mapping[int, Sequence[Any]], num_blocks: int, total: int) -> tuple[int, int]:
    """The `num_blocks` consecutive blocks where the swarm is weakest (see `weakest_window`).

    `entries_by_block` maps a block index to the DHT entries (or bare announcement values) under its key.
    """
    if total < 1:
        raise ValueError("the model has no blocks")
    return weakest_window(block_throughputs(entries_by_block, total), num_blocks)


def weakest_window(per_block: Sequence[float], num_blocks: int) -> tuple[int, int]:
    """Lowest minimum throughput, then lowest sum, then earliest start: a chain is as fast as its slowest block."""
    total = len(per_block)
    num_blocks = max(1, min(num_blocks, total))
    best = min(
        range(total - num_blocks + 1),
        key=lambda s: (min(per_block[s : s + num_blocks]), sum(per_block[s : s + num_blocks]), s),
    )
    return best, best + num_blocks


def should_move(
    entries_by_block: Mapping[int, Sequence[Any]],
    peer_id: str,
    span: tuple[int, int],
    throughput: float,
    total: int,
    min_gain: float = 1.25,
) -> tuple[int, int] | None:
    """Where this server should move, or None to stay (paper §3.2: servers close the swarm's worst bottleneck).

    The swarm is as fast as its slowest block. Compare that minimum with this server staying put and with it moved
    to the span `choose_span` picks from everyone else's announcements; move only for a clear gain (`min_gain`), or
    when moving closes a gap (no server at all on some block) without opening another.
    """
    others = block_throughputs(entries_by_block, total, exclude_peer=peer_id)
    size = span[1] - span[0]

    def bottleneck(where: tuple[int, int]) -> float:
        return min(t + (throughput if where[0] <= b < where[1] else 0.0) for b, t in enumerate(others))

    target = weakest_window(others, size)
    if target == span:
        return None
    stay, moved = bottleneck(span), bottleneck(target)
    if (stay == 0 and moved > 0) or (stay > 0 and moved > stay * min_gain):
        return target
    return None


# --- KV budget -------------------------------------------------------------------------------------------------------


class KVPool:
    """The whole KV budget as one tensor, handed out as `KVCache` views (first fit, coalescing frees).

    A unit is one token of one block: a key and a value vector for every KV head.
    """

    def __init__(
        self, units: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        if units < 1:
            raise ValueError("the KV budget must hold at least one token of one block")
        self.units = units
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self._unit_elems = 2 * kv_heads * head_dim
        self.buffer = torch.zeros(units * self._unit_elems, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(0, units)]  # sorted (offset, size)
        self._freed = asyncio.Event()  # replaced on every free; waiters hold the one they saw

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def free_units(self) -> int:
        return sum(size for _, size in self._free)

    def try_allocate(self, blocks: int, batch: int, max_length: int) -> Any | None:
        """A cache for `blocks` x `batch` x `max_length`, or None if no free range is large enough now."""
        from petal.kernels.cache import KVCache

        need = blocks * batch * max_length
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = (offset + need, size - need)
                chunk = self.buffer[offset * self._unit_elems : (offset + need) * self._unit_elems]
                kv = chunk.view(2, blocks, batch, self.kv_heads, max_length, self.head_dim)
                cache = KVCache([kv[0, b] for b in range(blocks)], [kv[1, b] for b in range(blocks)])
                cache.pool_range = (offset, need)  # type: ignore[attr-defined]
                return cache
        return None

    async def allocate(self, blocks: int, batch: int, max_length: int, timeout: float) -> Any:
        """Wait up to `timeout` seconds for room; raises PetalError("busy") otherwise."""
        need = blocks * batch * max_length
        if need > self.units:
            raise PetalError(
                "busy",
                f"a cache of {blocks} blocks x batch {batch} x {max_length} tokens needs {need} token-blocks, more "
                f"than this server's whole budget of {self.units}; ask for a shorter max_length or a smaller batch",
            )
        deadline = time.monotonic() + timeout
        while (cache := self.try_allocate(blocks, batch, max_length)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PetalError(
                    "busy",
                    f"no KV-cache room for {need} token-blocks within {timeout:.0f}s ({self.free_units} of "
                    f"{self.units} free); retry later or use another server",
                )
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                pass
        return cache

    def free(self, cache: Any) -> None:
        """Give a cache's range back (idempotent) and wake waiting sessions."""
        span = getattr(cache, "pool_range", None)
        if span is None:
            return
        cache.pool_range = None
        offset, size = span
        self._free.append((offset, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, sz in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + sz)
            else:
                merged.append((off, sz))
        self._free = merged
        self._freed.set()
        self._freed = asyncio.Event()


# --- compute thread --------------------------------------------------------------------------------------------------


class ComputeWorker:
    """One thread running jobs by priority (then arrival); `submit` raises "busy" when `max_queue` jobs wait."""

    def __init__(self, max_queue: int, name: str = "petal-compute") -> None:
        self.max_queue = max_queue
        self._queue: queue.PriorityQueue[tuple[int, int, Any, Any, tuple[Any, ...]]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        if self._stopped:
            raise PetalError("unavailable", "this server is shutting down; use another one")
        if self._queue.qsize() >= self.max_queue:
            raise PetalError("busy", f"{self.max_queue} requests are already queued here; retry later or elsewhere")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((priority, next(self._seq), future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if future is None:
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


# --- push: inputs sent server to server ------------------------------------------------------------------------------

PUSH_WINDOW = 4
"""Pushed inputs one session buffers ahead of the step that takes them; more are refused with "busy"."""
PUSH_ACK_TIMEOUT = 10.0
"""Longest a server waits to dial the next hop or for its ack of a push before telling the client it did not push."""


class PushInbox:
    """Inputs pushed to one inference session, by step number: at most PUSH_WINDOW, only for steps not yet taken.

    A push may arrive before or after the client's step message that waits for it. While that step waits, a push
    for it is checked at once (so the pusher gets the error); one that came earlier is checked when taken.
    """

    def __init__(self, batch: int, max_length: int) -> None:
        self.batch = batch
        self.max_length = max_length
        self.last = -1  # highest step number this session has run
        self._items: dict[int, tuple[str, torch.Tensor]] = {}
        self._waiting: tuple[int, int, str] | None = None  # (step, tokens, sender) of the step now waiting
        self._event = asyncio.Event()
        self._on_arrival: Callable[[int], None] | None = None

    def expect(
        self, step: int | None, tokens: int = 0, sender: str = "", on_arrival: Callable[[int], None] | None = None
    ) -> None:
        """Announce the step now waiting (tokens and the peer whose push it takes), or None when it stops waiting.

        `on_arrival(step)` runs inside `put` as soon as that step's push is accepted, so the waiting session can
        start computing before the push is even acked (waking its task first costs ~1 ms of loop turns).
        Pushes for earlier steps can no longer be used (the client numbers its steps in order): they are dropped.
        """
        self._waiting = None if step is None else (step, tokens, sender)
        self._on_arrival = None if step is None else on_arrival
        if step is not None:
            for s in [s for s in self._items if s < step]:
                del self._items[s]

    def _check(self, sender: str, step: int, hidden: torch.Tensor) -> None:
        if self._waiting is None or self._waiting[0] != step:
            return
        _, tokens, expected = self._waiting
        if sender != expected:
            raise PetalError(
                "bad_request", f"push for step {step}: this session takes it from peer {expected}, not from {sender}"
            )
        check_pushed(hidden, self.batch, tokens)

    def put(self, sender: str, step: int, hidden: torch.Tensor) -> None:
        """Buffer a push; raises PetalError (for the pusher's error frame) if it does not fit the session."""
        if step <= self.last:
            raise PetalError("bad_request", f"push for step {step}: this session has already run step {self.last}")
        if hidden.shape[0] != self.batch or hidden.shape[1] > self.max_length:
            raise PetalError(
                "wrong_shape",
                f"push: this session takes up to [batch={self.batch}, tokens="
                f"{self.max_length}, hidden], the push is {list(hidden.shape)}",
            )
        if step in self._items:
            raise PetalError("bad_request", f"push for step {step}: this session already holds one")
        if len(self._items) >= PUSH_WINDOW:
            raise PetalError("busy", f"push: this session already buffers {PUSH_WINDOW} pushed steps")
        self._check(sender, step, hidden)
        self._items[step] = (sender, hidden)
        self._event.set()
        if self._on_arrival is not None and self._waiting is not None and self._waiting[0] == step:
            self._on_arrival(step)

    def take(self, step: int) -> torch.Tensor | None:
        """The pushed input of `step` if it is here and fits the waiting step (a misfit is dropped and logged)."""
        item = self._items.pop(step, None)
        if item is None:
            return None
        try:
            self._check(item[0], step, item[1])
        except PetalError as e:
            log.info("dropping a push that came before its step: %s", e)
            return None
        return item[1]

    def taken(self, step: int) -> None:
        """Step `step` ran (from a push or the client's own input): older and equal pushes are stale now."""
        self.last = max(self.last, step)
        for s in [s for s in self._items if s <= self.last]:
            del self._items[s]

    async def changed(self) -> None:
        """Return once a push arrived since the last call."""
        await self._event.wait()
        self._event.clear()


class Pusher:
    """One session's push stream to the next hop: opened on first use, reused every step, reopened for a new peer."""

    def __init__(self, transport: Any, local: Callable[[str, PushRequest], None]) -> None:
        self.transport = transport
        self._local = local  # delivers pushes whose next hop is this same server
        self._stream: Stream | None = None
        self._peer: PeerAddr | None = None

    async def push(self, target: PushTarget, step: int, hidden: dict[str, Any]) -> bool:
        """Send one step's encoded output; True once the next hop acked it, False (logged) on any failure.

        The client learns the outcome from its reply's `pushed` and sends the next hop the input itself when False.
        """
        try:
            if target.peer == self.transport.peer_id:
                self._local(target.peer, PushRequest(target.session, step, decode_tensor(hidden)))
                return True
            peer = PeerAddr(target.peer, target.addrs)
            if self._stream is None or self._peer != peer:
                await self.close()
                self._stream = await self.transport.open_stream(peer, PUSH_PROTOCOL, timeout=PUSH_ACK_TIMEOUT)
                self._peer = peer
            await self._stream.send({"session": target.session, "step": step, "hidden": hidden})
            check_reply(await self._stream.recv(timeout=PUSH_ACK_TIMEOUT), "ok")
            return True
        except PetalError as e:  # the next hop refused the push (or sent a malformed ack: start over)
            log.info("push of step %d to %s refused: %s", step, target.peer, e)
            if e.code in ("bad_frame", "bad_tensor", "too_large"):
                await self.close()
            return False
        except (TransportError, TimeoutError, OSError) as e:
            log.info("push of step %d to %s failed: %s", step, target.peer, e)
            await self.close(reset=True)
            return False

    async def close(self, reset: bool = False) -> None:
        stream, self._stream, self._peer = self._stream, None, None
        if stream is not None:
            try:
                await (stream.reset() if reset else stream.close())
            except TransportError:
                pass


# --- the server ------------------------------------------------------------------------------------------------------


class BlockServer:
    """Serves blocks `[span.start, span.end)` of one model on `transport`; `announcer` (optional) publishes it."""

    def __init__(
        self,
        span: Any,  # petal.kernels.span.Span
        *,
        model: str,
        fingerprint: str,
        family: str,
        num_blocks: int,
        transport: Any,
        settings: ServeSettings = ServeSettings(),
        announce: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None,
        withdraw: Callable[[str], Awaitable[Any]] | None = None,
        throughput: float = 0.0,
    ) -> None:
        self.span = span
        self.model = model
        self.fingerprint = fingerprint
        self.family = family
        self.num_blocks = num_blocks
        self.transport = transport
        self.settings = settings
        self.throughput = throughput
        self._announce = announce
        self._withdraw = withdraw
        self.dtype = DTYPES[settings.dtype]
        self.device = torch.device(settings.device)
        self.runner = span.family.BlockRunner(span.config)
        for p in span.parameters():
            p.requires_grad_(False)  # servers never train their own weights; backward asks only for input grads
        self.served = ServedSpan(
            model=model,
            fingerprint=fingerprint,
            start=span.start,
            end=span.end,
            hidden_size=span.hidden_size,
            max_batch=settings.max_batch,
            max_length=settings.max_length,
        )
        kv_heads, head_dim = span.family.kv_shape(span.config)
        budget = settings.max_cache_tokens or DEFAULT_CACHE_TOKENS_PER_BLOCK * len(span.blocks)
        self.pool = KVPool(budget, kv_heads, head_dim, self.dtype, self.device)
        self.worker: ComputeWorker | None = None
        self.sessions = 0
        self._running = False
        self._refresher: asyncio.Task[None] | None = None
        self._published_cache = -1
        self._inboxes: dict[str, PushInbox] = {}  # session id -> pushed inputs, for sessions opened with push

    # lifecycle

    @property
    def keys(self) -> list[str]:
        return [block_key(self.model, b) for b in range(self.span.start, self.span.end)]

    async def start(self) -> None:
        self.worker = ComputeWorker(self.settings.max_queue, name=f"petal-compute-{self.span.start}-{self.span.end}")
        self._running = True
        self.transport.set_handler(INFO_PROTOCOL, self._handle_info)
        self.transport.set_handler(FORWARD_PROTOCOL, self._handle_forward)
        self.transport.set_handler(BACKWARD_PROTOCOL, self._handle_backward)
        self.transport.set_handler(INFERENCE_PROTOCOL, self._handle_inference)
        self.transport.set_handler(PUSH_PROTOCOL, self._handle_push)
        await self.publish("online")
        if self._announce is not None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="block-server-refresh")
        log.info(
            "serving %s blocks [%d, %d) (%s, %s, quant %s): %.0f tokens/s, KV budget %d token-blocks (%.1f MiB)",
            self.model,
            self.span.start,
            self.span.end,
            self.settings.device,
            self.settings.dtype,
            self.settings.quant,
            self.throughput,
            self.pool.units,
            self.pool.nbytes / 2**20,
        )

    async def stop(self) -> None:
        """Stop taking work, withdraw the announcements, end the compute thread."""
        if not self._running:
            return
        self._running = False
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        if self._withdraw is not None:
            for key in self.keys:
                try:
                    await asyncio.wait_for(self._withdraw(key), timeout=3.0)
                except Exception as e:  # noqa: BLE001 - the entry expires on its own
                    log.info("could not withdraw %s: %s", key, e)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)

    def record(self, state: str) -> dict[str, Any]:
        """The value announced under every hosted block's key."""
        value = ServerRecord(
            addrs=tuple(self.transport.listen_addrs),
            start=self.span.start,
            end=self.span.end,
            state=state,
            throughput=round(self.throughput, 3),
            cache_tokens_left=self.pool.free_units // len(self.span.blocks),
            dtype=self.settings.dtype,
            version=PROTOCOL_VERSION,
        ).to_value()
        return {**value, "q": self.settings.quant, "fp": self.fingerprint}

    async def _refresh_loop(self) -> None:
        """Re-announce when the free KV budget moved by over a tenth of the total, so routers see real capacity."""
        while True:
            await asyncio.sleep(self.settings.refresh_period)
            left = self.pool.free_units // len(self.span.blocks)
            if abs(left - self._published_cache) * 10 > self.pool.units // len(self.span.blocks):
                await self.publish("online")

    async def publish(self, state: str) -> None:
        if self._announce is None:
            return
        value = self.record(state)
        self._published_cache = value["c"]
        model = ModelRecord(self.model, self.fingerprint, self.num_blocks, self.family).to_value()
        results = await asyncio.gather(
            *(self._announce(key, value) for key in self.keys),
            self._announce(MODELS_KEY, model),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                log.warning("announcing %s blocks [%d, %d) failed: %s", self.model, self.span.start, self.span.end, r)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "start": self.span.start,
            "end": self.span.end,
            "hidden_size": self.span.hidden_size,
            "dtype": self.settings.dtype,
            "quant": self.settings.quant,
            "max_length": self.settings.max_length,
            "max_batch": self.settings.max_batch,
            "cache_tokens_left": self.pool.free_units // len(self.span.blocks),
            "throughput": self.throughput,
            "version": PROTOCOL_VERSION,
            "codecs": list(CODECS),
            "sessions": self.sessions,
            "push": True,
        }

    # compute (runs in the worker thread)

    def _blocks(self, start: int, end: int) -> list[Any]:
        return list(self.span.blocks[start - self.span.start : end - self.span.start])

    def _run(
        self,
        blocks: list[Any],
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
        cache: Any | None,
        position: int,
    ) -> torch.Tensor:
        """Blocks in order, with deep prompts added before each block to positions < prompt length."""
        batch, t, _ = hidden.shape
        total = position + t
        if mask is None:
            mask = torch.ones(batch, total, dtype=torch.long, device=self.device)
        prepared = self.runner.prepare(mask.to(self.device), t, self.dtype)
        if prompts is not None:
            prompts = prompts.to(self.device, self.dtype)
        for i, block in enumerate(blocks):
            if prompts is not None:
                hidden = _add_prompts(hidden, prompts[i], position)
            hidden = self.runner.run_block(block, hidden, prepared, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.advance(t)
        return hidden

    def _lora_on_device(self, lora: Lora | None, *, trainable: bool) -> Lora | None:
        """The request's LoRA weights on this server's device (as fresh leaves needing grad for a backward)."""
        if lora is None:
            return None
        return Lora(lora.scale, {k: t.to(self.device).requires_grad_(trainable) for k, t in lora.weights.items()})

    def _forward_sync(self, req: ForwardRequest) -> dict[str, Any]:
        blocks = self._blocks(req.start, req.end)
        lora = self._lora_on_device(req.lora, trainable=False)
        with torch.no_grad(), apply_lora(lora, zip(range(req.start, req.end), blocks)):
            hidden = req.hidden.to(self.device, self.dtype)
            out = self._run(blocks, hidden, req.mask, req.prompts, None, 0)
        return {"hidden": encode_tensor(out, req.codec)}

    def _backward_sync(self, req: ForwardRequest) -> dict[str, Any]:
        """Gradients w.r.t. the input, the deep prompts and the client's LoRA weights (never the server's own)."""
        assert req.grad is not None
        blocks = self._blocks(req.start, req.end)
        lora = self._lora_on_device(req.lora, trainable=True)
        with torch.enable_grad(), apply_lora(lora, zip(range(req.start, req.end), blocks)):
            hidden = req.hidden.to(self.device, self.dtype).requires_grad_(True)
            prompts = None if req.prompts is None else req.prompts.to(self.device, self.dtype).requires_grad_(True)
            out = self._run(blocks, hidden, req.mask, prompts, None, 0)
            inputs = [hidden] if prompts is None else [hidden, prompts]
            lora_leaves = [] if lora is None else list(lora.weights.values())
            grads = torch.autograd.grad(
                out, inputs + lora_leaves, grad_outputs=req.grad.to(self.device, self.dtype), allow_unused=True
            )
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs + lora_leaves, grads)]
        reply = {"grad": encode_tensor(grads[0], req.codec), "grad_prompts": None}
        if prompts is not None:
            reply["grad_prompts"] = encode_tensor(grads[1], req.codec)
        if lora is not None:
            reply["grad_lora"] = encode_lora_grads(dict(zip(lora.weights, grads[len(inputs) :])), req.codec)
        return reply

    def _step_sync(self, blocks: list[Any], step: StepRequest, cache: Any, codec: str) -> dict[str, Any]:
        if step.position < cache.length:
            cache.truncate(step.position)
        with torch.no_grad():
            hidden = step.hidden.to(self.device, self.dtype)
            out = self._run(blocks, hidden, step.mask, step.prompts, cache, step.position)
        return {"hidden": encode_tensor(out, codec), "position": cache.length}

    async def _compute(self, priority: int, fn: Callable[..., Any], *args: Any) -> tuple[Any, Any]:
        """Run `fn` on the worker within the request timeout; returns (result, None) or raises PetalError.

        On a timeout of a job that is already running, raises PetalError("timeout") with the still-running future
        attached as `e.running`, so that its caller can keep its memory alive until the thread lets go of it.
        """
        return await self._finish(self._submit(priority, fn, *args))

    def _submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        if not self._running or self.worker is None:
            raise PetalError("unavailable", "this server is shutting down; use another one")
        return self.worker.submit(priority, fn, *args)

    async def _finish(self, future: concurrent.futures.Future[Any]) -> tuple[Any, Any]:
        """The job's result within the request timeout (see `_compute`)."""
        wrapped = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({wrapped}, timeout=self.settings.request_timeout)
        if not done:
            error = PetalError(
                "timeout",
                f"the request did not finish within {self.settings.request_timeout:.0f}s "
                "on this server; retry elsewhere",
            )
            error.running = None if future.cancel() else future  # type: ignore[attr-defined]
            raise error
        return wrapped.result(), None

    # handlers

    async def _first_message(self, stream: Stream) -> object:
        return await stream.recv(timeout=FIRST_MESSAGE_TIMEOUT)

    async def _reply(self, stream: Stream, work: Callable[[object], Awaitable[dict[str, Any]]]) -> None:
        """One request, one reply; every failure becomes an error frame."""
        msg = await self._first_message(stream)
        try:
            reply = await work(msg)
        except PetalError as e:
            reply = error_reply(e)
        except (ValueError, RuntimeError) as e:  # e.g. a shape the kernels reject that validation let through
            log.warning("%s request failed: %s", stream.protocol_id, e)
            reply = error_reply(PetalError("bad_request", f"the request could not be computed: {e}"[:1000]))
        except Exception as e:
            log.exception("%s request failed unexpectedly", stream.protocol_id)
            reply = error_reply(PetalError("internal", f"{type(e).__name__}: {e}"[:1000]))
        await stream.send(reply)

    async def _handle_info(self, stream: Stream) -> None:
        async def work(msg: object) -> dict[str, Any]:
            parse_info_request(msg, self.served)
            return self.info()

        await self._reply(stream, work)

    async def _handle_forward(self, stream: Stream) -> None:
        async def work(msg: object) -> dict[str, Any]:
            req = parse_forward(msg, self.served)
            return (await self._compute(TRAINING, self._forward_sync, req))[0]

        await self._reply(stream, work)

    async def _handle_backward(self, stream: Stream) -> None:
        async def work(msg: object) -> dict[str, Any]:
            req = parse_forward(msg, self.served, backward=True)
            return (await self._compute(TRAINING, self._backward_sync, req))[0]

        await self._reply(stream, work)

    async def _handle_inference(self, stream: Stream) -> None:
        """Open (reserve a cache), then steps until the client closes, idles out, or a step times out.

        Every client message gets exactly one reply, in order. A step without `hidden` waits for its input by push
        (see `PushInbox`); if the client's next message arrives first, that step is answered `{"skipped": true}`
        and the client's message (its own copy of the input) is served instead, so the client always decides.
        """
        msg = await self._first_message(stream)
        try:
            if not self._running:
                raise PetalError("unavailable", "this server is shutting down; use another one")
            opened = parse_open(msg, self.served)
            blocks = self._blocks(opened.start, opened.end)
            cache = await self.pool.allocate(len(blocks), opened.batch, opened.max_length, self.settings.alloc_timeout)
        except PetalError as e:
            await stream.send(error_reply(e))
            return
        running: concurrent.futures.Future[Any] | None = None
        session_id = secrets.token_hex(16)
        inbox = PushInbox(opened.batch, opened.max_length) if opened.push else None
        if inbox is not None:
            self._inboxes[session_id] = inbox
        pusher = Pusher(self.transport, self._deliver)
        self.sessions += 1
        try:
            await stream.send({"ok": True, "max_length": opened.max_length, "session": session_id, "push": opened.push})
            pending: object = None  # a client message read while waiting for a push
            while True:
                if pending is not None:
                    msg, pending = pending, None
                else:
                    try:
                        msg = await stream.recv(timeout=self.settings.idle_timeout)
                    except StreamClosed:
                        return
                    except TimeoutError:
                        await stream.send(
                            error_reply(
                                PetalError(
                                    "timeout",
                                    f"no step for {self.settings.idle_timeout:.0f}s: session closed, cache freed",
                                )
                            )
                        )
                        return
                try:
                    step = parse_step(
                        msg,
                        self.served,
                        blocks=len(blocks),
                        batch=opened.batch,
                        max_length=opened.max_length,
                        length=cache.length,
                    )
                    job: concurrent.futures.Future[Any] | None = None
                    if step.hidden is None:
                        try:
                            hidden, pending, job = await self._await_push(
                                stream,
                                inbox,
                                step,
                                lambda s: self._submit(INFERENCE, self._step_sync, blocks, s, cache, opened.codec),
                            )
                        except StreamClosed:
                            return
                        if hidden is None:
                            await stream.send({"skipped": True, "position": cache.length})
                            continue
                        step = replace(step, hidden=hidden)
                    if inbox is not None and step.step is not None:
                        inbox.taken(step.step)
                    if job is None:
                        job = self._submit(INFERENCE, self._step_sync, blocks, step, cache, opened.codec)
                    reply, _ = await self._finish(job)
                    if step.push_to is not None:
                        assert step.step is not None
                        reply["pushed"] = await pusher.push(step.push_to, step.step, reply["hidden"])
                except PetalError as e:
                    await stream.send(error_reply(e))
                    if e.code == "timeout" and hasattr(e, "running"):  # the cache may be mid-write: end the session
                        running = getattr(e, "running", None)
                        return
                    continue
                except (ValueError, RuntimeError) as e:
                    log.warning("inference step failed: %s", e)
                    reply = error_reply(PetalError("bad_request", f"the step could not be computed: {e}"[:1000]))
                except Exception as e:
                    log.exception("inference step failed unexpectedly")
                    reply = error_reply(PetalError("internal", f"{type(e).__name__}: {e}"[:1000]))
                await stream.send(reply)
        finally:
            self.sessions -= 1
            self._inboxes.pop(session_id, None)
            await pusher.close()
            if running is not None and not running.done():
                loop = asyncio.get_running_loop()
                running.add_done_callback(lambda _: loop.call_soon_threadsafe(self.pool.free, cache))
            else:
                self.pool.free(cache)

    # push: server to server

    async def _await_push(
        self,
        stream: Stream,
        inbox: PushInbox | None,
        step: StepRequest,
        start: Callable[[StepRequest], concurrent.futures.Future[Any]],
    ) -> tuple[torch.Tensor | None, object, concurrent.futures.Future[Any] | None]:
        """The pushed input of `step` and its job, or (None, message, None) when the client's next message comes first.

        `start(step with its input)` submits the step's compute; it is called the moment the push is accepted
        (inside the push handler, before the ack goes out), so the hop-to-hop latency does not include waking
        this task. The job is None if starting it failed (the caller then retries and reports the error).
        Raises StreamClosed when the client goes away, PetalError("timeout") after `request_timeout` without either.
        """
        if inbox is None:
            raise PetalError(
                "bad_request",
                "this session was opened without push: send 'hidden' with every step, or open with push: true",
            )
        assert step.step is not None and step.push_from is not None
        started: asyncio.Future[tuple[torch.Tensor, concurrent.futures.Future[Any] | None]] = (
            asyncio.get_running_loop().create_future()
        )

        def arrived(number: int) -> None:
            hidden = inbox.take(number)
            if hidden is None or started.done():
                return
            try:
                job: concurrent.futures.Future[Any] | None = start(replace(step, hidden=hidden))
            except PetalError:  # busy or stopping: the caller submits again and answers with the error
                job = None
            started.set_result((hidden, job))

        inbox.expect(step.step, step.tokens, step.push_from, on_arrival=arrived)
        recv = asyncio.ensure_future(stream.recv())
        changed: asyncio.Future[None] | None = None
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            while True:
                if started.done():  # the push came first and its compute is already queued
                    hidden, job = started.result()
                    return hidden, None, job
                if recv.done():
                    return None, recv.result(), None
                hidden = inbox.take(step.step)
                if hidden is not None:
                    return hidden, None, None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PetalError(
                        "timeout",
                        f"no push for step {step.step} from {step.push_from} within "
                        f"{self.settings.request_timeout:.0f}s; send the step's hidden states yourself",
                    )
                changed = asyncio.ensure_future(inbox.changed())
                await asyncio.wait({recv, changed, started}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
        finally:
            inbox.expect(None)
            for task in (recv, changed):  # also when this session is cancelled: no task left pending or unread
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    def _deliver(self, sender: str, push: PushRequest) -> None:
        """Hand a validated push to its session's inbox; raises PetalError for the pusher's error frame."""
        inbox = self._inboxes.get(push.session)
        if inbox is None:
            raise PetalError(
                "not_found",
                f"push: no inference session {push.session[:8]}… here takes pushes (it "
                "ended, or was opened without push: true)",
            )
        inbox.put(sender, push.step, push.hidden)

    async def _handle_push(self, stream: Stream) -> None:
        """Pushes from one previous hop, one ack (`{"ok": true}` or an error frame) each, until it closes."""
        while True:
            try:
                msg = await stream.recv(timeout=self.settings.idle_timeout)
            except (StreamClosed, TimeoutError):
                return
            try:
                self._deliver(stream.peer_id, parse_push(msg, self.served))
                reply: dict[str, Any] = {"ok": True}
            except PetalError as e:
                reply = error_reply(e)
            except Exception as e:
                log.exception("push from %s failed unexpectedly", stream.peer_id)
                reply = error_reply(PetalError("internal", f"{type(e).__name__}: {e}"[:1000]))
            await stream.send(reply)


def _add_prompts(hidden: torch.Tensor, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """`hidden[:, p - position] += prompt[:, p]` for the positions p in this chunk that are < prompt length."""
    t = hidden.shape[1]
    lo, hi = position, min(position + t, prompt.shape[1])
    if hi <= lo:
        return hidden
    n = hi - lo
    return torch.cat([hidden[:, :n] + prompt[:, lo:hi], hidden[:, n:]], dim=1)


# --- throughput --------------------------------------------------------------------------------------------------


def hardware_id(device: str) -> str:
    """What the throughput cache is keyed on besides the model: the machine's compute device."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{platform.machine()}:{platform.processor() or 'unknown'}:{os.cpu_count()}:threads{torch.get_num_threads()}"


def measure_throughput(server: BlockServer, tokens: int = 64, budget_s: float = 1.0) -> float:
    """Forward tokens/s of the whole span: a warm-up pass, then passes of `tokens` tokens for about `budget_s`."""
    hidden = torch.randn(1, tokens, server.span.hidden_size, dtype=server.dtype, device=server.device)
    blocks = list(server.span.blocks)
    with torch.no_grad():
        server._run(blocks, hidden, None, None, None, 0)
        runs, t0 = 0, time.perf_counter()
        while runs < 2 or (time.perf_counter() - t0 < budget_s and runs < 50):
            server._run(blocks, hidden, None, None, None, 0)
            runs += 1
        if server.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return tokens * runs / elapsed


def cached_throughput(server: BlockServer, state_dir: Path) -> float:
    """Measure once per hardware + model + span + dtype + quant; later starts read `throughput.json`."""
    path = state_dir / "throughput.json"
    key = "|".join(
        [
            hardware_id(server.settings.device),
            server.fingerprint,
            f"{server.span.start}:{server.span.end}",
            server.settings.dtype,
            server.settings.quant,
        ]
    )
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    value = cache.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    value = measure_throughput(server)
    cache[key] = value
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the measured throughput in %s: %s", path, e)
    return value


# --- entry point from Node ---------------------------------------------------------------------------------------


def resolve_model_dir(serve: str) -> Path:
    """`serve` is a model dir path, or the name of a model pulled into the models dir."""
    from petal.daemon.pull import default_models_dir

    path = Path(serve).expanduser()
    if (path / "config.json").is_file():
        return path
    candidate = default_models_dir() / serve
    if (candidate / "config.json").is_file():
        return candidate
    raise ServeError(
        f"--serve {serve!r} is neither a model dir nor a model in {default_models_dir()}; "
        f"pull it first with `petald pull {serve}` or pass the model dir's path"
    )


def settings_from_config(config: Any) -> ServeSettings:
    return ServeSettings(
        dtype=config.dtype,
        device=config.device,
        quant=config.quant,
        max_batch=config.max_batch,
        max_length=config.max_length,
        max_cache_tokens=config.max_cache_tokens,
        codec=config.codec,
        alloc_timeout=config.alloc_timeout,
    )


async def _swarm_entries(dht: Any, model: str, total: int) -> dict[int, list[Any]]:
    results = await asyncio.gather(*(dht.get(block_key(model, b)) for b in range(total)), return_exceptions=True)
    return {b: r for b, r in enumerate(results) if not isinstance(r, BaseException)}


Progress = Callable[[dict[str, Any]], None]
"""Receives serving progress events (``{"event": "loading", ...}``); may be called from a loader thread."""


@dataclass(frozen=True)
class ServePlan:
    """What `serve_plan` will load: resolved before any weight is read, so a bad request fails fast and cheaply."""

    info: Any  # petal.kernels.store.ModelInfo
    start: int
    end: int
    settings: ServeSettings
    rebalance: bool  # span chosen by the swarm's needs (--num-blocks): a Rebalancer may move it later


async def plan_serving(node: Any, serve: str, *, blocks: str | None = None, num_blocks: int | None = None) -> ServePlan:
    """Resolve the model and choose the span (`blocks` "A:B", else `num_blocks` where the swarm is weakest, else all).

    Raises ServeError with a message that says what to change.
    """
    from petal.kernels.store import ModelStoreError, open_model

    settings = settings_from_config(node.config)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ServeError("--device cuda but torch sees no CUDA device; use --device cpu or fix the CUDA setup")
    try:
        info = await asyncio.to_thread(open_model, resolve_model_dir(serve))
    except ModelStoreError as e:
        raise ServeError(str(e)) from None
    total = info.num_blocks
    if blocks:
        start, end = parse_blocks(blocks, total)
    elif num_blocks:
        entries = await _swarm_entries(node.dht, info.name, total)
        start, end = choose_span(entries, num_blocks, total)
        log.info("chose blocks [%d, %d) of %s where the swarm is weakest", start, end, info.name)
    else:
        start, end = 0, total
    return ServePlan(info, start, end, settings, rebalance=bool(num_blocks and not blocks))


async def serve_plan(node: Any, plan: ServePlan, progress: Progress | None = None) -> list[Any]:
    """Load, measure, serve and announce `plan`'s span; returns [server] or [server, Rebalancer].

    The Rebalancer holds the same list and replaces the server in it when it moves, so the caller keeps the list
    itself (as `node.servers`) and stops its items in reverse order.
    """
    servers: list[Any] = [await _load_and_serve(node, plan.info, plan.start, plan.end, plan.settings, progress)]
    if plan.rebalance:
        servers.append(Rebalancer(node, plan.info, servers, plan.settings, node.config.rebalance_period))
        servers[-1].start()
    return servers


async def start_serving(node: Any) -> list[Any]:
    """Load the span configured at startup (--serve, --blocks / --num-blocks) and serve it; see `serve_plan`."""
    from petal.daemon.node import StartupError

    config = node.config
    try:
        plan = await plan_serving(node, config.serve, blocks=config.blocks, num_blocks=config.num_blocks)
    except ServeError as e:
        raise StartupError(str(e)) from None
    return await serve_plan(node, plan)


def _load_span(info: Any, start: int, end: int, settings: ServeSettings, progress: Progress | None) -> Any:
    """`load_span`, one block at a time when someone watches the progress (same result: blocks are independent)."""
    from petal.kernels.span import Span
    from petal.kernels.store import load_span

    kwargs = dict(dtype=DTYPES[settings.dtype], device=settings.device, quant=settings.quant)
    if progress is None:
        return load_span(info, start, end, **kwargs)
    blocks: list[Any] = []
    for index in range(start, end):
        blocks.extend(load_span(info, index, index + 1, **kwargs).blocks)
        progress(
            {
                "event": "loading",
                "model": info.name,
                "start": start,
                "end": end,
                "block": index,
                "loaded": index + 1 - start,
                "total": end - start,
            }
        )
    return Span(info.config, blocks, start)


async def _load_and_serve(
    node: Any, info: Any, start: int, end: int, settings: ServeSettings, progress: Progress | None = None
) -> BlockServer:
    log.info("loading %s blocks [%d, %d) from %s", info.name, start, end, info.path)
    span = await asyncio.to_thread(_load_span, info, start, end, settings, progress)
    server = BlockServer(
        span,
        model=info.name,
        fingerprint=info.fingerprint,
        family=info.family,
        num_blocks=info.num_blocks,
        transport=node.transport,
        settings=settings,
        announce=node.announce,
        withdraw=node.withdraw,
    )
    await server.publish("joining")
    if progress is not None:
        progress({"event": "measuring", "model": info.name, "start": start, "end": end})
    server.throughput = await asyncio.to_thread(cached_throughput, server, Path(node.config.state_dir))
    await server.start()
    if progress is not None:
        progress(
            {
                "event": "serving",
                "model": info.name,
                "start": start,
                "end": end,
                "throughput": round(server.throughput, 3),
            }
        )
    return server


class Rebalancer:
    """Every `period` seconds (± 30% jitter, so servers never all move at once) asks `should_move` and moves.

    It lives in `node.servers` beside the block server it manages (replacing it there when it moves) and is stopped
    with them. A move stops the old server first (withdrawing its entries; its sessions fail over on the client side).
    """

    def __init__(self, node: Any, info: Any, servers: list[Any], settings: ServeSettings, period: float) -> None:
        self.node, self.info, self.servers, self.settings, self.period = node, info, servers, settings, period
        self._task: asyncio.Task[None] | None = None
        self.moves = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="rebalance")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        import random

        while True:
            await asyncio.sleep(self.period * random.uniform(0.7, 1.3))
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001 - keep serving; the next round tries again
                log.warning("rebalancing check failed: %s", e)

    async def check(self) -> bool:
        current: BlockServer = self.servers[0]
        total = self.info.num_blocks
        entries = await _swarm_entries(self.node.dht, self.info.name, total)
        target = should_move(
            entries, self.node.peer_id, (current.span.start, current.span.end), current.throughput, total
        )
        if target is None:
            return False
        log.info(
            "moving from blocks [%d, %d) to [%d, %d): the swarm's slowest blocks are there",
            current.span.start,
            current.span.end,
            *target,
        )
        await current.stop()
        self.servers[0] = await _load_and_serve(self.node, self.info, *target, self.settings)
        self.moves += 1
        return True


__all__ = [
    "BlockServer",
    "ComputeWorker",
    "KVPool",
    "Rebalancer",
    "ServeError",
    "ServePlan",
    "ServeSettings",
    "TransportError",
    "block_throughputs",
    "choose_span",
    "measure_throughput",
    "parse_blocks",
    "plan_serving",
    "serve_plan",
    "should_move",
    "start_serving",
    "weakest_window",
]
