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
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from petal.protocol import PROTOCOL_VERSION
from petal.protocol.errors import PetalError
from petal.protocol.messages import (
    BACKWARD_PROTOCOL,
    CODECS,
    FORWARD_PROTOCOL,
    INFERENCE_PROTOCOL,
    INFO_PROTOCOL,
    ForwardRequest,
    ServedSpan,
    StepRequest,
    error_reply,
    parse_forward,
    parse_info_request,
    parse_open,
    parse_step,
)
from petal.protocol.records import MODELS_KEY, OFFLINE, ModelRecord, RecordError, ServerRecord, block_key
from petal.protocol.tensors import encode_tensor

from .transport import Stream, StreamClosed, TransportError

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

    def __init__(self, units: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device) -> None:
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
        await self.publish("online")
        if self._announce is not None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="block-server-refresh")
        log.info(
            "serving %s blocks [%d, %d) (%s, %s, quant %s): %.0f tokens/s, KV budget %d token-blocks (%.1f MiB)",
            self.model, self.span.start, self.span.end, self.settings.device, self.settings.dtype,
            self.settings.quant, self.throughput, self.pool.units, self.pool.nbytes / 2**20,
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
            *(self._announce(key, value) for key in self.keys), self._announce(MODELS_KEY, model),
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

    def _forward_sync(self, req: ForwardRequest) -> dict[str, Any]:
        with torch.no_grad():
            hidden = req.hidden.to(self.device, self.dtype)
            out = self._run(self._blocks(req.start, req.end), hidden, req.mask, req.prompts, None, 0)
        return {"hidden": encode_tensor(out, req.codec)}

    def _backward_sync(self, req: ForwardRequest) -> dict[str, Any]:
        assert req.grad is not None
        with torch.enable_grad():
            hidden = req.hidden.to(self.device, self.dtype).requires_grad_(True)
            prompts = None if req.prompts is None else req.prompts.to(self.device, self.dtype).requires_grad_(True)
            out = self._run(self._blocks(req.start, req.end), hidden, req.mask, prompts, None, 0)
            inputs = [hidden] if prompts is None else [hidden, prompts]
            grads = torch.autograd.grad(out, inputs, grad_outputs=req.grad.to(self.device, self.dtype))
        reply = {"grad": encode_tensor(grads[0], req.codec), "grad_prompts": None}
        if prompts is not None:
            reply["grad_prompts"] = encode_tensor(grads[1], req.codec)
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
        if not self._running or self.worker is None:
            raise PetalError("unavailable", "this server is shutting down; use another one")
        future = self.worker.submit(priority, fn, *args)
        wrapped = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({wrapped}, timeout=self.settings.request_timeout)
        if not done:
            error = PetalError("timeout", f"the request did not finish within {self.settings.request_timeout:.0f}s "
                               "on this server; retry elsewhere")
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
        except Exception as e:  # noqa: BLE001 - never let one request take the server down
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
        """Open (reserve a cache), then steps until the client closes, idles out, or a step times out."""
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
        self.sessions += 1
        try:
            await stream.send({"ok": True, "max_length": opened.max_length})
            while True:
                try:
                    msg = await stream.recv(timeout=self.settings.idle_timeout)
                except StreamClosed:
                    return
                except TimeoutError:
                    await stream.send(error_reply(PetalError(
                        "timeout", f"no step for {self.settings.idle_timeout:.0f}s: session closed, cache freed")))
                    return
                try:
                    step = parse_step(msg, self.served, blocks=len(blocks), batch=opened.batch,
                                      max_length=opened.max_length, length=cache.length)
                    reply, _ = await self._compute(INFERENCE, self._step_sync, blocks, step, cache, opened.codec)
                except PetalError as e:
                    await stream.send(error_reply(e))
                    if e.code == "timeout":  # the cache may be mid-write: end the session
                        running = getattr(e, "running", None)
                        return
                    continue
                except (ValueError, RuntimeError) as e:
                    log.warning("inference step failed: %s", e)
                    reply = error_reply(PetalError("bad_request", f"the step could not be computed: {e}"[:1000]))
                except Exception as e:  # noqa: BLE001
                    log.exception("inference step failed unexpectedly")
                    reply = error_reply(PetalError("internal", f"{type(e).__name__}: {e}"[:1000]))
                await stream.send(reply)
        finally:
            self.sessions -= 1
            if running is not None and not running.done():
                loop = asyncio.get_running_loop()
                running.add_done_callback(lambda _: loop.call_soon_threadsafe(self.pool.free, cache))
            else:
                self.pool.free(cache)


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
    key = "|".join([hardware_id(server.settings.device), server.fingerprint, f"{server.span.start}:{server.span.end}",
                    server.settings.dtype, server.settings.quant])
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
    from .pull import default_models_dir

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
        dtype=config.dtype, device=config.device, quant=config.quant, max_batch=config.max_batch,
        max_length=config.max_length, max_cache_tokens=config.max_cache_tokens, codec=config.codec,
        alloc_timeout=config.alloc_timeout,
    )


async def _swarm_entries(dht: Any, model: str, total: int) -> dict[int, list[Any]]:
    results = await asyncio.gather(*(dht.get(block_key(model, b)) for b in range(total)), return_exceptions=True)
    return {b: r for b, r in enumerate(results) if not isinstance(r, BaseException)}


async def start_serving(node: Any) -> list[BlockServer]:
    """Load the configured span, measure it, serve it on `node.transport` and announce it on `node.dht`."""
    from petal.kernels.store import ModelStoreError, open_model

    from .node import StartupError

    config = node.config
    settings = settings_from_config(config)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda but torch sees no CUDA device; use --device cpu or fix the CUDA setup")
    try:
        info = await asyncio.to_thread(open_model, resolve_model_dir(config.serve))
    except (ServeError, ModelStoreError) as e:
        raise StartupError(str(e)) from None
    total = info.num_blocks
    try:
        if config.blocks:
            start, end = parse_blocks(config.blocks, total)
        elif config.num_blocks:
            entries = await _swarm_entries(node.dht, info.name, total)
            start, end = choose_span(entries, config.num_blocks, total)
            log.info("chose blocks [%d, %d) of %s where the swarm is weakest", start, end, info.name)
        else:
            start, end = 0, total
    except ServeError as e:
        raise StartupError(str(e)) from None
    servers = [await _load_and_serve(node, info, start, end, settings)]
    if config.num_blocks and not config.blocks:
        servers.append(Rebalancer(node, info, servers, settings, config.rebalance_period))
        servers[-1].start()
    return servers


async def _load_and_serve(node: Any, info: Any, start: int, end: int, settings: ServeSettings) -> BlockServer:
    from petal.kernels.store import load_span

    log.info("loading %s blocks [%d, %d) from %s", info.name, start, end, info.path)
    span = await asyncio.to_thread(
        load_span, info, start, end, dtype=DTYPES[settings.dtype], device=settings.device, quant=settings.quant
    )
    server = BlockServer(
        span, model=info.name, fingerprint=info.fingerprint, family=info.family, num_blocks=info.num_blocks,
        transport=node.transport, settings=settings, announce=node.announce, withdraw=node.withdraw,
    )
    await server.publish("joining")
    server.throughput = await asyncio.to_thread(cached_throughput, server, Path(node.config.state_dir))
    await server.start()
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
        target = should_move(entries, self.node.peer_id, (current.span.start, current.span.end),
                             current.throughput, total)
        if target is None:
            return False
        log.info("moving from blocks [%d, %d) to [%d, %d): the swarm's slowest blocks are there",
                 current.span.start, current.span.end, *target)
        await current.stop()
        self.servers[0] = await _load_and_serve(self.node, self.info, *target, self.settings)
        self.moves += 1
        return True


__all__ = [
    "BlockServer",
    "ComputeWorker",
    "KVPool",
    "ServeError",
    "ServeSettings",
    "TransportError",
    "block_throughputs",
    "choose_span",
    "should_move",
    "weakest_window",
    "Rebalancer",
    "measure_throughput",
    "parse_blocks",
    "start_serving",
]
