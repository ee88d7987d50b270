"""Forward and backward through a chain of remote spans for training, retried hop by hop.

Each hop goes to a server picked at random weighted by throughput; a failed hop is banned and retried elsewhere, and
a large batch is split across the servers of the same span.

Activation reuse: ``forward_kept`` asks every hop to keep its forward's graph (``keep``; the server's
`ActivationStore`) and returns a `KeptChain`: the hops, each hop's input and the id its server keeps the graph under.
``backward`` given that chain (``kept``) runs no forward at all: each hop, last first, gets the gradient, its
activation id and its input, and the server runs only autograd on the kept graph, so forward+backward costs one
forward and one backward per hop, as local autograd does. Without a chain (a stateless caller, or one that does not
fit the call: another input or block range), ``backward`` re-runs the forward along a new chain to get each hop's
input, and each server recomputes its forward with grad (one extra forward per hop except the last, two on the
server). Either way losing state costs time, never a wrong result: a server that no longer holds a graph (evicted,
expired, restarted) recomputes from the input sent along, and a hop that fails is banned and its blocks run again
elsewhere by recomputation.

Pipelines: a batch of several rows runs as micro-batches (`chains.pipeline_parts`, ``pipeline_min_tokens``), each
entering a hop once the one ahead has left it (`_Progress`), so the chain's servers compute at the same time; a kept
forward keeps one graph per micro-batch (`KeptPiece`) and the backward runs them back the same way, last hop first.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from petal.daemon.routing.chains import Hop, no_route_error, pipeline_parts, split_batch, throughput_chain
from petal.daemon.routing.faults import DEFAULT_MAX_RETRIES, check_hidden, gave_up, is_server_fault, slice_prompts
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.routing.router import Router, no_adapter_error
from petal.daemon.routing.swarm import ServerInfo, SwarmView
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora

T = TypeVar("T")


@dataclass
class _Call:
    """Shared arguments of one forward/backward call."""

    router: Router
    view: SwarmView
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    offset: int  # the block the prompts' first row belongs to
    codec: str | None
    allowed: list[str] | None
    blocked: list[str]
    max_retries: int
    timeout: float
    split_min_rows: int
    failures: list[BaseException] = field(default_factory=list)
    lora: Lora | None = None  # client-owned LoRA weights; each hop gets its own blocks' share
    adapter: str | None = None  # a server-hosted adapter: only servers hosting it, each request names it
    keep: bool = False  # ask each hop to keep its forward's graph for the backward (no batch split then)
    pipeline_min_tokens: int = 0  # 0: no pipeline (see chains.pipeline_parts)

    def candidates(self) -> list[ServerInfo]:
        return self.router.candidates(self.view, self.allowed, self.blocked, self.adapter)

    def next_hop(self, a: int, b: int) -> Hop:
        """A throughput-weighted server for block ``a`` onwards (up to ``b``)."""
        chain = throughput_chain(self.candidates(), a, a + 1, self.router.rng)
        if chain is None:
            if self.adapter is not None and not self.candidates():
                raise no_adapter_error(self.view.model, self.adapter)
            raise no_route_error(self.view.model, a, b, self.candidates(), list(self.view.servers.values()))
        server = chain[0].server
        return Hop(server, a, min(server.end, b))

    def span(self, hop: Hop) -> RemoteSpan:
        return self.router.span(self.view, hop, self.codec, self.adapter)

    def failed(self, hop: Hop, error: BaseException, what: str) -> None:
        if not is_server_fault(error):
            raise error
        self.router.ban(hop.peer_id, error)
        self.failures.append(error)
        if len(self.failures) > self.max_retries:
            raise gave_up(what, len(self.failures), error) from error


async def _forward_hop(call: _Call, hop: Hop, x: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """One hop's forward and, asked to keep, the server's id of its kept graph; a large batch is split across the
    servers that cover exactly this hop (never one asked to keep)."""
    prompts = slice_prompts(call.prompts, call.offset, hop)
    if call.keep:
        return await call.span(hop).forward_keep(x, call.mask, prompts, timeout=call.timeout, lora=call.lora)
    batch = x.shape[0]
    peers = [s for s in call.candidates() if s.covers(hop.start, hop.end)]
    if batch < 2 * call.split_min_rows or len(peers) < 2:
        return await call.span(hop).forward(x, call.mask, prompts, timeout=call.timeout, lora=call.lora), None
    parts = split_batch(batch, [hop.server] + [s for s in peers if s.peer_id != hop.peer_id], call.split_min_rows)

    async def part(server: ServerInfo, lo: int, hi: int) -> torch.Tensor:
        sub = Hop(server, hop.start, hop.end)
        return await call.span(sub).forward(
            x[lo:hi],
            None if call.mask is None else call.mask[lo:hi],
            None if prompts is None else prompts[:, lo:hi],
            timeout=call.timeout,
            lora=call.lora,
        )

    results = await asyncio.gather(*(part(*p) for p in parts), return_exceptions=True)
    for (server, _, _), r in zip(parts, results, strict=True):
        if isinstance(r, BaseException):
            call.failed(Hop(server, hop.start, hop.end), r, f"forward of blocks {hop.start}..{hop.end}")
    outputs = [r for r in results if not isinstance(r, BaseException)]
    if len(outputs) < len(results):
        raise _Retry()
    return torch.cat(outputs, dim=0), None


class _Retry(Exception):
    """A split hop lost a part: its servers are already banned and counted; choose again."""


@dataclass(frozen=True)
class KeptHop:
    """One hop of a kept forward: the server, its input, and the id it keeps the graph under (None: not kept)."""

    hop: Hop
    hidden: torch.Tensor
    activation: str | None = None


@dataclass(frozen=True)
class KeptPiece:
    """The rows [lo, hi) of a kept forward (all of them, or one micro-batch of a pipeline) and their hops in order."""

    lo: int
    hi: int
    hops: tuple[KeptHop, ...]


@dataclass(frozen=True)
class KeptChain:
    """What ``forward_kept`` leaves for the backward: the call it was (to check a backward is the same one) and the
    hops of each of its pieces (one, or the micro-batches it ran as a pipeline)."""

    model: str
    start: int
    end: int
    hidden: torch.Tensor
    mask: torch.Tensor | None
    pieces: tuple[KeptPiece, ...]

    @property
    def nbytes(self) -> int:
        return sum(h.hidden.numel() * h.hidden.element_size() for p in self.pieces for h in p.hops)

    def fits(self, model: str, start: int, end: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Whether a backward of these arguments is this forward's (same model, blocks, input and mask)."""
        return (
            (model, start, end) == (self.model, self.start, self.end)
            and _same(hidden, self.hidden)
            and (mask is None) == (self.mask is None)
            and (mask is None or _same(mask, self.mask))
        )


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


class _Progress:
    """How far one micro-batch of a pipeline has got along its chain: a forward's level is the block it has run up
    to, a backward's minus the first block it has run back to. The micro-batch behind runs a hop only once this one
    has run past that hop's blocks, so each server gets them one at a time, in order (queued together, a server
    would batch them, and the chain would compute in turn again)."""

    def __init__(self) -> None:
        self.reached = -math.inf
        self._moved = asyncio.Event()

    def advance(self, level: float) -> None:
        self.reached = max(self.reached, level)
        self._moved.set()
        self._moved = asyncio.Event()

    async def wait(self, level: float) -> None:
        while self.reached < level:
            await self._moved.wait()


async def _forward_trace(
    call: _Call,
    a: int,
    b: int,
    x: torch.Tensor,
    *,
    last: bool = True,
    behind: _Progress | None = None,
    progress: _Progress | None = None,
) -> tuple[torch.Tensor | None, list[KeptHop]]:
    """Run [a, b) hop by hop; returns the output and each hop with its input (and its kept graph's id).

    With ``last=False`` the final hop is chosen but not run (backward only needs its input); output is then None.
    In a pipeline, each hop first waits until the micro-batch ahead (``behind``) has run past it, and this one's
    ``progress`` is told as its hops complete.
    """
    try:
        return await _run_hops(call, a, b, x, last, behind, progress)
    finally:
        if progress is not None:
            progress.advance(math.inf)  # done or failed: nothing waits on it any longer


async def _run_hops(
    call: _Call, a: int, b: int, x: torch.Tensor, last: bool, behind: _Progress | None, progress: _Progress | None
) -> tuple[torch.Tensor | None, list[KeptHop]]:
    trace: list[KeptHop] = []
    while a < b:
        hop = call.next_hop(a, b)
        if behind is not None:
            await behind.wait(hop.end)
        if not last and hop.end == b:
            trace.append(KeptHop(hop, x))
            return None, trace
        try:
            out, activation = await _forward_hop(call, hop, x)
        except _Retry:
            continue
        except Exception as e:
            if not is_server_fault(e):
                raise  # the request itself is wrong: another server would refuse it too
            call.failed(hop, e, f"forward of blocks {hop.start}..{hop.end} of {call.view.model}")
            continue
        # the references would run without the server-hosted adapter or the client's LoRA: an honest server would fail
        checkable = call.adapter is None and call.lora is None
        if checkable and x.shape[0] < 2 * call.split_min_rows and call.router.spot.wants():  # trust: spotcheck.py
            wrong = await call.router.spot.check_hop(
                call.view,
                hop,
                x,
                out,
                call.mask,
                slice_prompts(call.prompts, call.offset, hop),
                codec=call.codec,
                allowed=call.allowed,
                blocked=call.blocked,
                timeout=call.timeout,
            )
            if wrong is not None:  # the server is banned already: count it and run the hop again elsewhere
                call.failures.append(wrong)
                if len(call.failures) > call.max_retries:
                    raise gave_up(f"forward of blocks {hop.start}..{hop.end}", len(call.failures), wrong) from wrong
                continue
        trace.append(KeptHop(hop, x, activation))
        x, a = out, hop.end
        if progress is not None:
            progress.advance(a)
    return x, trace


async def _backward_range(
    call: _Call,
    a: int,
    b: int,
    x: torch.Tensor,
    grad: torch.Tensor,
    grad_prompts: torch.Tensor | None,
    grad_lora: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``x`` (input of block a) given ``grad`` w.r.t. the output of block b-1.

    Fills ``grad_prompts`` and ``grad_lora`` (each LoRA key belongs to one block, so exactly one hop reports it;
    a hop retried elsewhere overwrites nothing it did not compute).
    """
    _, trace = await _forward_trace(call, a, b, x, last=False)
    return await _backward_hops(call, trace, grad, grad_prompts, grad_lora)


async def _backward_hops(
    call: _Call,
    hops: list[KeptHop],
    grad: torch.Tensor,
    grad_prompts: torch.Tensor | None,
    grad_lora: dict[str, torch.Tensor] | None,
    behind: _Progress | None = None,
    progress: _Progress | None = None,
) -> torch.Tensor:
    """The backward of ``hops`` (a chain, in order), last first; a hop that fails runs again elsewhere by
    recomputation (`_backward_range`). In a pipeline, ``behind`` and ``progress`` as in `_forward_trace`."""
    for kept in reversed(hops):
        hop, inp = kept.hop, kept.hidden
        if behind is not None:
            await behind.wait(-hop.start)
        prompts = slice_prompts(call.prompts, call.offset, hop)
        try:
            grad, gp, gl = await call.span(hop).backward(
                inp, grad, call.mask, prompts, timeout=call.timeout, lora=call.lora, activation=kept.activation
            )
        except Exception as e:
            if not is_server_fault(e):
                raise  # the request itself is wrong: another server would refuse it too
            call.failed(hop, e, f"backward of blocks {hop.start}..{hop.end} of {call.view.model}")
            grad = await _backward_range(call, hop.start, hop.end, inp, grad, grad_prompts, grad_lora)
            continue
        if grad_prompts is not None and gp is not None:
            grad_prompts[hop.start - call.offset : hop.end - call.offset] = gp
        if grad_lora is not None and gl is not None:
            grad_lora.update(gl)
        if progress is not None:
            progress.advance(-hop.start)
    return grad


async def _backward_pieces(
    call: _Call,
    start: int,
    end: int,
    hidden: torch.Tensor,
    pieces: list[tuple[int, int, tuple[KeptHop, ...] | None]],
    grad: torch.Tensor,
    grad_prompts: torch.Tensor | None,
    grad_lora: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """The backward of rows ``[lo, hi)`` for each piece, along its kept hops, or (hops None) along a forward re-run
    for its hops' inputs first: one piece as it is, several as a pipeline (the re-run forwards first block first,
    the backwards last hop first). Each piece's LoRA gradients are summed, as one batch's would be."""
    if len(pieces) == 1:
        hops = pieces[0][2]
        if hops is None:
            return await _backward_range(call, start, end, hidden, grad, grad_prompts, grad_lora)
        return await _backward_hops(call, list(hops), grad, grad_prompts, grad_lora)
    forwards = [_Progress() for _ in pieces]
    backwards = [_Progress() for _ in pieces]
    loras: list[dict[str, torch.Tensor] | None] = [None if grad_lora is None else {} for _ in pieces]

    async def piece(i: int, lo: int, hi: int, hops: tuple[KeptHop, ...] | None) -> torch.Tensor:
        sub = _rows(call, lo, hi)
        try:
            if hops is None:
                behind = forwards[i - 1] if i else None
                _, trace = await _forward_trace(
                    sub, start, end, hidden[lo:hi], last=False, behind=behind, progress=forwards[i]
                )
                hops = tuple(trace)
            return await _backward_hops(
                sub,
                list(hops),
                grad[lo:hi],
                None if grad_prompts is None else grad_prompts[:, lo:hi],  # a view: filled in place
                loras[i],
                behind=backwards[i - 1] if i else None,
                progress=backwards[i],
            )
        finally:  # a re-run forward's progress is told by _forward_trace itself
            backwards[i].advance(math.inf)

    grads = await _all_or_none([piece(i, lo, hi, hops) for i, (lo, hi, hops) in enumerate(pieces)])
    if grad_lora is not None:
        for part in loras:
            for key, g in (part or {}).items():
                grad_lora[key] = g if key not in grad_lora else grad_lora[key] + g
    return torch.cat(grads, dim=0)


def _parts(call: _Call, start: int, end: int, hidden: torch.Tensor) -> list[tuple[int, int]]:
    """The micro-batches (row ranges) ``hidden`` runs as through [start, end): `pipeline_parts` for the number of
    hops a chain has now; one part when the call asks for no pipeline."""
    if call.pipeline_min_tokens <= 0:
        return [(0, hidden.shape[0])]
    chain = throughput_chain(call.candidates(), start, end, call.router.rng)
    return pipeline_parts(hidden.shape[0], hidden.shape[1], len(chain or ()), call.pipeline_min_tokens)


def _rows(call: _Call, lo: int, hi: int) -> _Call:
    """``call`` for rows [lo, hi) of its batch (a micro-batch); the failure count stays shared."""
    return replace(
        call,
        mask=None if call.mask is None else call.mask[lo:hi],
        prompts=None if call.prompts is None else call.prompts[:, lo:hi],
    )


async def _all_or_none(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """The results of ``coros`` run at once, in order; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _prepare_call(
    router: Router,
    model: str,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: torch.Tensor | None,
    start: int,
    end: int | None,
    kwargs: dict[str, Any],
) -> tuple[_Call, int]:
    check_hidden(hidden)
    view = await router.view(model)
    total = view.num_blocks or 0  # a refreshed view always knows it
    end = total if end is None else end
    if not 0 <= start < end <= total:
        raise PetalError("bad_request", f"block range [{start}, {end}) is outside {model}'s {view.num_blocks} blocks")
    if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise PetalError(
            "wrong_shape", f"mask must be [batch, tokens] = {list(hidden.shape[:2])}, got {list(mask.shape)}"
        )
    if prompts is not None and (
        prompts.dim() != 4 or prompts.shape[0] != end - start or prompts.shape[1] != hidden.shape[0]
    ):
        raise PetalError(
            "wrong_shape",
            f"prompts must be [blocks={end - start}, batch={hidden.shape[0]}, P, hidden], got {list(prompts.shape)}",
        )
    lora = kwargs.get("lora")
    if lora is not None:
        outside = [i for i in lora.blocks if not start <= i < end]
        if outside:
            raise PetalError(
                "bad_request",
                f"lora has weights for block(s) {outside[:5]} outside the call's blocks "
                f"[{start}, {end}); send only the weights of the blocks you run (Lora.for_blocks)",
            )
    allowed, tokens = kwargs.get("allowed"), kwargs.get("pipeline_min_tokens")
    call = _Call(
        router,
        view,
        mask,
        prompts,
        start,
        kwargs.get("codec"),
        None if allowed is None else list(allowed),
        list(kwargs.get("blocked") or ()),
        kwargs.get("max_retries", DEFAULT_MAX_RETRIES),
        kwargs.get("timeout", 60.0),
        kwargs.get("split_min_rows", 8),
        lora=lora,
        adapter=kwargs.get("adapter"),
        keep=kwargs.get("keep", False),
        pipeline_min_tokens=router.pipeline_min_tokens if tokens is None else tokens,
    )
    return call, end


async def forward(
    router: Router,
    model: str,
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    codec: str | None = None,
    allowed: Iterable[str] | None = None,
    blocked: Iterable[str] | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    timeout: float = 60.0,
    split_min_rows: int = 8,
    lora: Lora | None = None,
    adapter: str | None = None,
    pipeline_min_tokens: int | None = None,
) -> torch.Tensor:
    """Blocks [start, end) (the whole model by default) applied to ``hidden`` ``[B, T, H]``, no cache.

    Each hop goes to a server picked at random weighted by throughput; a failed hop is banned and retried
    elsewhere; a batch of at least ``2 * split_min_rows`` rows is split across servers of the same span. A batch
    of several rows runs as a pipeline of micro-batches of at least ``pipeline_min_tokens`` tokens (0: never; None:
    the router's setting), so the chain's servers compute at the same time (`chains.pipeline_parts`).
    ``lora`` (client-owned LoRA weights for blocks inside [start, end)) is applied by the servers for this call;
    ``adapter`` names a server-hosted adapter (only servers hosting it are used).
    """
    out, _ = await _forward(
        router,
        model,
        hidden,
        mask,
        prompts,
        start,
        end,
        dict(
            codec=codec,
            allowed=allowed,
            blocked=blocked,
            max_retries=max_retries,
            timeout=timeout,
            split_min_rows=split_min_rows,
            lora=lora,
            adapter=adapter,
            pipeline_min_tokens=pipeline_min_tokens,
        ),
    )
    return out


async def forward_kept(
    router: Router,
    model: str,
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, KeptChain]:
    """``forward`` (same arguments, no batch split) with every hop asked to keep its graph: the output and the
    chain to give ``backward`` as ``kept``, which then runs no forward again (see the module doc)."""
    return await _forward(router, model, hidden, mask, prompts, start, end, {**kwargs, "keep": True})


async def _forward(
    router: Router,
    model: str,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: torch.Tensor | None,
    start: int,
    end: int | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, KeptChain]:
    call, end = await _prepare_call(router, model, hidden, mask, prompts, start, end, kwargs)
    hidden = hidden.detach()
    parts = _parts(call, start, end, hidden)
    if len(parts) == 1:
        out, trace = await _forward_trace(call, start, end, hidden)
        assert out is not None
        return out, KeptChain(model, start, end, hidden, mask, (KeptPiece(0, hidden.shape[0], tuple(trace)),))
    progress = [_Progress() for _ in parts]
    runs = await _all_or_none(
        [
            _forward_trace(
                _rows(call, lo, hi),
                start,
                end,
                hidden[lo:hi],
                behind=progress[i - 1] if i else None,
                progress=progress[i],
            )
            for i, (lo, hi) in enumerate(parts)
        ]
    )
    pieces = tuple(KeptPiece(lo, hi, tuple(trace)) for (lo, hi), (_, trace) in zip(parts, runs, strict=True))
    return torch.cat([out for out, _ in runs if out is not None], dim=0), KeptChain(
        model, start, end, hidden, mask, pieces
    )


async def backward(
    router: Router,
    model: str,
    hidden: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    codec: str | None = None,
    allowed: Iterable[str] | None = None,
    blocked: Iterable[str] | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    timeout: float = 60.0,
    lora: Lora | None = None,
    adapter: str | None = None,
    kept: KeptChain | None = None,
    pipeline_min_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Gradients w.r.t. ``hidden`` (the input of block ``start``), ``prompts`` and ``lora``'s weights, given ``grad``
    w.r.t. the output of block ``end - 1``. ``kept``: the chain of this call's ``forward_kept``: its hops' kept
    graphs are reused; without it (or when it is another call's) the forward is re-run along a chain to get each
    hop's input (see module doc). Several rows run as a pipeline either way (``pipeline_min_tokens`` as in
    ``forward``; a kept chain's own micro-batches when reused). Returns ``(grad_in, grad_prompts or None, grad_lora
    or None)``; ``grad_lora`` has ``lora``'s keys.
    """
    call, end = await _prepare_call(
        router,
        model,
        hidden,
        mask,
        prompts,
        start,
        end,
        dict(
            codec=codec,
            allowed=allowed,
            blocked=blocked,
            max_retries=max_retries,
            timeout=timeout,
            split_min_rows=1 << 30,
            lora=lora,
            adapter=adapter,
            pipeline_min_tokens=pipeline_min_tokens,
        ),
    )
    if tuple(grad.shape) != tuple(hidden.shape):
        raise PetalError(
            "wrong_shape", f"grad must have the shape of hidden {list(hidden.shape)}, got {list(grad.shape)}"
        )
    grad_prompts = None if prompts is None else torch.zeros_like(prompts)
    grad_lora: dict[str, torch.Tensor] | None = None if lora is None else {}
    pieces: list[tuple[int, int, tuple[KeptHop, ...] | None]]
    if kept is not None and kept.fits(model, start, end, hidden, mask):
        pieces = [(p.lo, p.hi, p.hops) for p in kept.pieces]
    else:  # re-run the forward for each hop's input: as a pipeline, as forward would
        pieces = [(lo, hi, None) for lo, hi in _parts(call, start, end, hidden)]
    grad_in = await _backward_pieces(call, start, end, hidden.detach(), pieces, grad.detach(), grad_prompts, grad_lora)
    if lora is not None:
        assert grad_lora is not None
        missing = sorted(set(lora.weights) - set(grad_lora))
        if missing:
            raise PetalError("internal", f"no server returned the gradients of lora {missing[:5]}; please report this")
        grad_lora = {k: grad_lora[k] for k in lora.weights}
    return grad_in, grad_prompts, grad_lora
