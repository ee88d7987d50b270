"""The client-side inference session: a stateful generation over a chain of remote spans, with failover and push.

An ``InferenceSession`` keeps, for every hop of its chain, each input it sent there. When a server fails mid-session
it is banned, the router finds a replacement for exactly the blocks that server ran (possibly several servers), the
stored inputs are replayed there as one prefill so the replacement holds the same KV cache, and the step goes on:
the caller sees no error and the same output (within the wire codec's tolerance). Where both sides support it,
servers push each step's output straight to the next hop (one pass along the chain per step, paper §3.2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from petal.daemon import trace
from petal.daemon.net.transport import StreamClosed, TransportError
from petal.daemon.routing.chains import Hop, prefill_parts
from petal.daemon.routing.faults import DEFAULT_MAX_RETRIES, check_hidden, gave_up, is_server_fault, slice_prompts
from petal.daemon.routing.remote import RemoteInference
from petal.daemon.routing.router import Router
from petal.daemon.routing.swarm import SwarmView
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora
from petal.protocol.messages import DEFAULT_MAX_TENSOR_BYTES, check_reorder

log = logging.getLogger("petal.session")

REPLAY_CHUNK_BYTES = DEFAULT_MAX_TENSOR_BYTES // 4
"""Largest piece of history (decoded) replayed to a replacement hop in one request; well under a server's limits."""


@dataclass
class _Link:
    """One open hop of a session, and every input it was sent (one tensor per step, in order)."""

    hop: Hop
    remote: RemoteInference
    history: list[torch.Tensor] = field(default_factory=list)
    no_push_to: set[str] = field(default_factory=set)  # next hops this server failed to push to: not tried again
    # this step's state (push mode): a message was sent; it waits for a push; the push came; it pushes on
    sent: bool = False
    awaiting: bool = False
    fed: bool = False
    pushes: bool = False
    reorder: bool = False  # this step's reorder is still to be applied by this hop's server (its history has it)

    def replay_input(self) -> torch.Tensor | None:
        return torch.cat(self.history, dim=1) if self.history else None

    def trim(self, tokens: int) -> None:
        """Forget inputs past the first ``tokens`` (of a step that failed before the session advanced)."""
        while self.history and sum(h.shape[1] for h in self.history) > tokens:
            self.history.pop()

    def cut(self, tokens: int) -> None:
        """Keep exactly the first ``tokens`` positions of the history (cutting inside a step's input if need be)."""
        kept, total = [], 0
        for h in self.history:
            if total >= tokens:
                break
            kept.append(h[:, : tokens - total])
            total += kept[-1].shape[1]
        self.history = kept


class InferenceSession:
    """A stateful generation session over blocks [start, end) of ``model`` (all of them by default).

    ``step(hidden, mask)`` takes ``[batch, t, hidden]`` for the next t tokens and returns the chain's output.
    ``mask`` is ``[batch, tokens so far + t]`` (1 = real, 0 = left padding), as for the servers. ``prompts``
    (``[end - start, batch, P, hidden]``) are deep prompts, applied by the servers to the first P positions.
    ``lora``: client-owned LoRA weights (any blocks of [start, end)); each hop gets its blocks' share once, at open
    (replacement hops too), and applies it to every step. ``codec``: the wire codec of every hop (None: the router's;
    ``auto`` picks per hop, see ``Router.codec_for``).
    Use as ``async with``; ``close`` frees the servers' caches.
    """

    def __init__(
        self,
        router: Router,
        model: str,
        max_length: int,
        batch: int = 1,
        *,
        start: int = 0,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        codec: str | None = None,
        allowed: Iterable[str] | None = None,
        blocked: Iterable[str] | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        step_timeout: float = 60.0,
        open_timeout: float = 30.0,
        push: bool = True,
        lora: Lora | None = None,
        adapter: str | None = None,
    ) -> None:
        if max_length < 1 or batch < 1:
            raise PetalError("bad_request", f"max_length and batch must be positive, got {max_length} and {batch}")
        self.router = router
        self.model = model
        self.max_length = max_length
        self.batch = batch
        self.start = start
        self.end = end
        self.prompts = prompts
        self.lora = lora
        self.adapter = adapter  # a server-hosted adapter: the chain uses only servers hosting it
        self.codec = codec
        self.allowed = None if allowed is None else list(allowed)
        self.blocked = list(blocked or ())
        self.max_retries = max_retries
        self.step_timeout = step_timeout
        self.open_timeout = open_timeout
        self.position = 0
        self.failovers = 0  # how many times a hop was replaced (for status and tests)
        self._view: SwarmView | None = None
        self._links: list[_Link] = []
        self._last_mask: torch.Tensor | None = None
        self._reorder: list[int] | None = None  # the current step's reorder (beam search), sent to hops not done yet
        self._opened = False
        self._closed = False
        self._lock = asyncio.Lock()
        self.push = push  # servers push each step's output to the next hop where both sides support it
        self._step_no = 0  # numbers every step, so a push is matched to the step that waits for it
        self.pushes = 0  # hop-to-hop pushes that delivered a step's input (for status, tests and benchmarks)

    @property
    def chain(self) -> list[Hop]:
        """The hops currently in use, in order."""
        return [link.hop for link in self._links]

    async def open(self) -> None:
        """Find the minimum-latency chain and open an inference stream on each hop (done by the first step too)."""
        if self._opened:
            return
        if self._closed:
            raise PetalError("bad_request", "this inference session is closed; open a new one")
        self._view = await self.router.view(self.model)
        if self.end is None:
            self.end = self._view.num_blocks or 0  # a refreshed view always knows it
        end = self.end
        if self.prompts is not None and self.prompts.shape[0] != end - self.start:
            raise PetalError(
                "wrong_shape",
                f"prompts cover {self.prompts.shape[0]} blocks but the session runs {end - self.start}",
            )
        outside = [] if self.lora is None else [b for b in self.lora.blocks if not self.start <= b < end]
        if outside:
            raise PetalError(
                "bad_request",
                f"lora has weights for block(s) {outside[:5]} outside the session's blocks [{self.start}, {end}); "
                "send only the weights of the blocks the session runs",
            )
        await self._skip_servers_too_small(self._view, self.start, end)
        failures: list[BaseException] = []
        self._links = await self._open_range(self.start, end, None, failures)
        self._opened = True

    async def _skip_servers_too_small(self, view: SwarmView, a: int, b: int) -> None:
        """Route around servers whose announced limits cannot hold this session; if every server of some block is
        too small, the session can never open: the caller's error (no server is banned), with the largest limits."""
        servers = [s for s in self.router.candidates(view, self.allowed, self.blocked) if s.start < b and s.end > a]
        await self.router.probe_all(self.model, servers)
        servers = [s for s in servers if not self.router.is_banned(s.peer_id)]  # the probe found them dead
        small = {s.peer_id for s in servers if not self.router.fits(s.peer_id, self.max_length, self.batch)}
        if not small:
            return
        for block in range(a, b):
            here = [s for s in servers if s.start <= block < s.end]
            if here and all(s.peer_id in small for s in here):
                lengths, batches = zip(*(self.router.limits[s.peer_id] for s in here), strict=True)
                raise PetalError(
                    "max_length" if self.max_length > max(lengths) else "too_large",
                    f"no server of block {block} of {self.model} takes a session of max_length {self.max_length} "
                    f"and batch {self.batch}: the most they take is max_length {max(lengths)}, batch "
                    f"{max(batches)}; ask for less",
                )
        self.blocked = [*self.blocked, *sorted(small - set(self.blocked))]

    async def _open_range(
        self, a: int, b: int, replay: torch.Tensor | None, failures: list[BaseException]
    ) -> list[_Link]:
        """Open a fresh chain for blocks [a, b) and, if ``replay`` is given, prefill it with that history.

        Failed servers are banned and another chain is tried, up to the retry budget shared through ``failures``.
        """
        assert self._view is not None
        while True:
            chain = await self.router.inference_chain(
                self.model, a, b, allowed=self.allowed, blocked=self.blocked, adapter=self.adapter
            )
            links: list[_Link] = []
            hop = chain[0]
            try:
                x = replay
                for hop in chain:
                    span = self.router.span(self._view, hop, self.codec, self.adapter)
                    link = _Link(
                        hop,
                        await span.open_inference(
                            self.max_length, self.batch, timeout=self.open_timeout, push=self.push, lora=self.lora
                        ),
                    )
                    links.append(link)
                    if x is not None:
                        out = await self._replay(link, x)
                        link.history.append(x)
                        x = out
                return links
            except Exception as e:
                await _close_links(links)
                if not is_server_fault(e):
                    raise
                self.router.ban(hop.peer_id, e)
                failures.append(e)
                if len(failures) > self.max_retries:
                    raise gave_up(f"opening blocks {a}..{b} of {self.model}", len(failures), e) from e
                log.info("could not open blocks [%d, %d) on %s (%s); trying another server", a, b, hop.peer_id, e)

    async def _replay(self, link: _Link, x: torch.Tensor) -> torch.Tensor:
        """Prefill a replacement hop with its history ``x``, in pieces that each fit one request: every step the
        caller sent fitted, but all of them together may not (and a failover must not turn into a "too_large")."""
        per_token = max(1, x.shape[0] * x.shape[2] * x.element_size())
        size = max(1, REPLAY_CHUNK_BYTES // per_token)
        outs: list[torch.Tensor] = []
        prompts = slice_prompts(self.prompts, self.start, link.hop)
        for pos in range(0, x.shape[1], size):
            piece = x[:, pos : pos + size]
            mask = None if self._last_mask is None else self._last_mask[:, : pos + piece.shape[1]]
            with_prompts = prompts if pos == 0 or (prompts is not None and pos < prompts.shape[2]) else None
            outs.append(
                await link.remote.step(piece, mask=mask, position=pos, prompts=with_prompts, timeout=self.step_timeout)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    async def step(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, reorder: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run the next ``t`` tokens through the chain; fails over transparently when a server dies.

        ``reorder`` (``batch`` row indices, beam search): before this step, row i of the session becomes a copy of
        row ``reorder[i]`` (the servers gather their caches' rows; this session its history, mask and prompts, so a
        failover replays the new order). If the step then fails, the reorder has still happened: retry without it.
        """
        check_hidden(hidden, self.batch)
        checked = check_reorder(reorder, self.batch, "session step")
        reorder = None if checked is None else list(checked)
        t = hidden.shape[1]
        if self.position + t > self.max_length:
            raise PetalError(
                "max_length",
                f"{self.position} tokens so far + {t} new exceed this session's max_length {self.max_length}; "
                "open a session with a larger max_length",
            )
        if mask is not None and tuple(mask.shape) != (self.batch, self.position + t):
            raise PetalError(
                "wrong_shape",
                f"mask must be [batch, tokens so far + new] = [{self.batch}, {self.position + t}], "
                f"got {tuple(mask.shape)}",
            )
        trace.mark("c.step")
        async with self._lock:
            await self.open()
            failures: list[BaseException] = []
            await self._repair(failures)
            if reorder is not None:
                self._reordered(reorder)
            x = hidden.detach().clone()
            try:
                out = await self._step_pipelined(x, mask, failures) if reorder is None else None
                if out is not None:
                    x = out
                elif self.push and any(self._pushes(i) for i in range(len(self._links) - 1)):
                    x = await self._step_push(x, mask, failures)
                else:
                    x = await self._step_plain(x, mask, failures)
                x = await self._spot_check(hidden, x, mask, failures)  # trust: may run the step again (spotcheck.py)
            except BaseException:
                for link in self._links:  # hops before the failure recorded this step's input; the caches roll back
                    link.trim(self.position)  # on the next step (its position truncates them)
                    if link.reorder:  # its server may or may not have reordered: rebuilt from history next step
                        await _close_links([link])
                raise
            finally:
                self._reorder = None
            self.position += t
            self._last_mask = None if mask is None else mask.detach().clone()
            for link in self._links:
                self.router.bans.succeeded(link.hop.peer_id)
            trace.mark("c.step_done")
            return x

    async def rollback(self, position: int) -> None:
        """Forget every position from ``position`` on (speculative decoding: drafted tokens that were rejected). The
        servers truncate their caches with the next step, which is sent at ``position``; the history kept for
        failover is cut to match."""
        async with self._lock:
            if not 0 <= position <= self.position:
                raise PetalError(
                    "bad_request", f"cannot roll back to position {position}: the session holds {self.position} tokens"
                )
            self.position = position
            for link in self._links:
                link.cut(position)
            if self._last_mask is not None:
                self._last_mask = self._last_mask[:, :position]

    def _reordered(self, reorder: list[int]) -> None:
        """Apply ``reorder`` to everything this session keeps per row; every hop's server is still to do it."""
        index = torch.tensor(reorder)
        for link in self._links:
            link.history = [h.index_select(0, index) for h in link.history]
            link.reorder = True
        if self._last_mask is not None:
            self._last_mask = self._last_mask.index_select(0, index)
        if self.prompts is not None and self.prompts.shape[1] == self.batch > 1:
            self.prompts = self.prompts.index_select(1, index)
        self._reorder = reorder

    def _reorder_for(self, link: _Link) -> list[int] | None:
        return self._reorder if link.reorder else None

    def _prompts(self, link: _Link, position: int | None = None) -> torch.Tensor | None:
        """The deep prompts ``link``'s server needs with a step at ``position`` (default: the session's): its blocks'
        share while the step starts inside the prompt positions, else None."""
        at = self.position if position is None else position
        if self.prompts is None or at >= self.prompts.shape[2]:
            return None
        return slice_prompts(self.prompts, self.start, link.hop)

    def _failed(self, link: _Link, error: Exception, failures: list[BaseException]) -> None:
        """Ban the hop's server for a server fault (re-raise anything else) and count it against the retry budget."""
        if not is_server_fault(error):
            raise error
        self.router.ban(link.hop.peer_id, error)
        failures.append(error)
        if len(failures) > self.max_retries:
            raise gave_up(f"inference step at position {self.position}", len(failures), error) from error

    async def _repair(self, failures: list[BaseException]) -> None:
        """Replace hops whose stream an earlier failed step left closed or with unread replies (no ban)."""
        i = 0
        while i < len(self._links):
            remote = self._links[i].remote
            if remote.closed or remote.outstanding:
                await self._replace(i, failures)
            i += 1

    async def _step_plain(
        self, x: torch.Tensor, mask: torch.Tensor | None, failures: list[BaseException]
    ) -> torch.Tensor:
        """The client sends each hop its input and waits for the output: a round trip per hop."""
        i = 0
        while i < len(self._links):
            link = self._links[i]
            try:
                out = await link.remote.step(
                    x,
                    mask=mask,
                    position=self.position,
                    prompts=self._prompts(link),
                    timeout=self.step_timeout,
                    reorder=self._reorder_for(link),
                )
            except Exception as e:
                if not is_server_fault(e):
                    raise  # the request itself is wrong: another server would refuse it too
                self._failed(link, e, failures)
                await self._replace(i, failures)
                continue  # the same input, now to the replacement's first hop
            link.history.append(x)
            link.reorder = False
            x = out
            i += 1
        return x

    async def _step_pipelined(
        self, x: torch.Tensor, mask: torch.Tensor | None, failures: list[BaseException]
    ) -> torch.Tensor | None:
        """A long step (a prompt's prefill) as a pipeline: cut along positions (`chains.prefill_parts`), chunk c
        enters a hop once chunk c - 1 has left it, so the chain's servers compute at the same time instead of in
        turn. None when the step is too short or the chain has one hop: the caller runs it whole.

        Each chunk makes a round trip per hop (no push: a chunk is long, a round trip is small beside it). When a
        hop fails, no chunk is sent any further, the ones in flight finish (so healthy servers' streams stay usable),
        nothing of the step is kept, and a server fault is handled as the other paths do (ban, replace the hop with
        its history replayed) before the caller runs the step whole; other errors are raised.
        """
        min_tokens = self.router.pipeline_min_tokens  # every decode step asks: answer it before allocating anything
        parts = prefill_parts(self.batch, x.shape[1], len(self._links), min_tokens) if min_tokens > 0 else []
        if len(parts) < 2:
            return None
        links = list(self._links)
        left = [[asyncio.Event() for _ in links] for _ in parts]  # chunk c has left hop i
        inputs: list[list[torch.Tensor]] = [[] for _ in links]  # each hop's input, chunk after chunk
        failed: list[tuple[int, Exception]] = []  # (hop, error): the first one stops the pipeline

        async def run(c: int, lo: int, hi: int) -> torch.Tensor | None:
            y, at = x[:, lo:hi], self.position + lo
            m = None if mask is None else mask[:, : at + hi - lo]
            for i, link in enumerate(links):
                if c:
                    await left[c - 1][i].wait()
                if failed:
                    return None
                inputs[i].append(y)  # in chunk order: chunk c - 1 appended before it left this hop
                try:
                    y = await link.remote.step(
                        y, mask=m, position=at, prompts=self._prompts(link, at), timeout=self.step_timeout
                    )
                except Exception as e:  # noqa: BLE001 - handled (or re-raised) once the chunks in flight are done
                    failed.append((i, e))
                    for events in left:  # wake the chunks waiting behind: they stop where they are
                        for event in events:
                            event.set()
                    return None
                left[c][i].set()
            return y

        outs = await asyncio.gather(*(run(c, lo, hi) for c, (lo, hi) in enumerate(parts)))
        if failed:
            i, error = failed[0]
            self._failed(links[i], error, failures)  # re-raises the caller's errors
            log.info(
                "a pipelined step at position %d failed on %s (%s); running it whole",
                self.position,
                links[i].hop.peer_id,
                error,
            )
            await self._replace(i, failures)
            await self._repair(failures)  # any other stream a failure closed
            return None
        for link, chunks in zip(links, inputs, strict=True):
            link.history.append(torch.cat(chunks, dim=1))  # one entry per step, as the other paths keep it
        return torch.cat([out for out in outs if out is not None], dim=1)

    def _pushes(self, i: int) -> bool:
        """Whether hop ``i`` may push its output to hop ``i + 1``."""
        a, b = self._links[i], self._links[i + 1]
        return a.remote.accepts_push and b.remote.accepts_push and b.hop.peer_id not in a.no_push_to

    async def _send_run(self, i: int, x: torch.Tensor, mask: torch.Tensor | None, step: int) -> None:
        """Send hop ``i`` its input ``x`` and, down the run of hops that can push to each other, messages that take
        their input by push; hops that already hold a message of this step are not pushed to."""
        links = self._links
        t = x.shape[1]

        def push_to(j: int) -> dict[str, Any] | None:
            ok = j + 1 < len(links) and not links[j + 1].sent and self._pushes(j)
            return links[j + 1].remote.push_target() if ok else None

        link = links[i]
        if link.remote.closed:
            raise StreamClosed(f"the inference stream to {link.hop.peer_id} is closed")
        target = push_to(i)
        await link.remote.send_step(
            x, mask, self.position, self._prompts(link), step=step, push_to=target, reorder=self._reorder_for(link)
        )
        link.sent, link.pushes = True, target is not None
        j = i + 1
        while links[j - 1].pushes:
            nxt = links[j]
            target = push_to(j)
            try:
                await nxt.remote.send_step(
                    None,
                    mask,
                    self.position,
                    self._prompts(nxt),
                    step=step,
                    tokens=t,
                    push_from=links[j - 1].hop.peer_id,
                    push_to=target,
                    reorder=self._reorder_for(nxt),
                )
            except (TransportError, TimeoutError, OSError) as e:  # found dead when its turn comes
                log.info("could not send step %d to %s: %s", step, nxt.hop.peer_id, e)
                return
            nxt.sent = nxt.awaiting = True
            nxt.pushes = target is not None
            j += 1

    async def _step_push(
        self, x: torch.Tensor, mask: torch.Tensor | None, failures: list[BaseException]
    ) -> torch.Tensor:
        """One pass along the chain: the client sends every hop its message up front, hop i pushes its output to
        hop i + 1 and also replies with it (the client keeps it as hop i + 1's input, for replay on failover).

        When a push did not happen (the pusher says so, or it died), the client sends that hop the input itself;
        the server answers the waiting message with a skip (or an output that the new message then recomputes),
        so the client's history is always exactly what each server ran.
        """
        step = self._step_no
        self._step_no += 1
        for link in self._links:
            link.sent = link.awaiting = link.fed = link.pushes = False
        shape = tuple(x.shape)
        i = 0
        while i < len(self._links):
            link = self._links[i]
            nxt = self._links[i + 1] if i + 1 < len(self._links) else None
            try:
                if link.remote.closed:
                    raise StreamClosed(f"the inference stream to {link.hop.peer_id} is closed")
                if not link.sent:
                    await self._send_run(i, x, mask, step)
                elif link.awaiting and not link.fed:  # no push came: send the input ourselves
                    target = nxt.remote.push_target() if link.pushes and nxt is not None else None
                    await link.remote.send_step(
                        x,
                        mask,
                        self.position,
                        self._prompts(link),
                        step=step,
                        push_to=target,
                        reorder=self._reorder_for(link),  # applied once by the server, whichever message runs
                    )
                    try:
                        await link.remote.recv_step(shape, x.dtype, self.step_timeout)  # the waiting message's answer
                    except PetalError as e:
                        log.debug("hop %s answered the superseded step %d with %s", link.hop.peer_id, step, e)
                elif link.fed and i > 0:  # its input was pushed: unless the pusher says the push failed after all
                    prev = self._links[i - 1]
                    failed = await link.remote.wait_reply_or_notice(prev.remote, step, self.step_timeout)
                    if failed is not None:
                        log.info("%s: %s; sending its input from here on", prev.hop.peer_id, failed.reason)
                        prev.no_push_to.add(link.hop.peer_id)
                        link.fed = False
                        self.pushes -= 1
                        continue  # the branch above sends the input and reads both answers
                reply = await link.remote.recv_step(shape, x.dtype, self.step_timeout)
                if reply.hidden is None:
                    raise PetalError("internal", f"{link.hop.peer_id} skipped step {step} although it had its input")
            except Exception as e:
                if not is_server_fault(e):
                    raise  # the request itself is wrong: another server would refuse it too
                self._failed(link, e, failures)
                await self._replace(i, failures)
                continue  # the same input, now to the replacement's first hop
            link.history.append(x)
            link.reorder = False
            if link.pushes and nxt is not None:
                if reply.pushed:
                    nxt.fed = True
                    self.pushes += 1
                else:
                    log.info(
                        "%s did not push step %d to %s; sending its input from here on",
                        link.hop.peer_id,
                        step,
                        nxt.hop.peer_id,
                    )
                    link.no_push_to.add(nxt.hop.peer_id)
            x = reply.hidden
            i += 1
        return x

    # --- spot checks (petal.daemon.routing.spotcheck): the session's only trust code ---------------------------

    async def _spot_check(
        self, hidden: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None, failures: list[BaseException]
    ) -> torch.Tensor:
        """Re-run a random fraction of this step's hops elsewhere and compare (``router.spot``). A hop found wrong is
        banned; it and the hops after it (their caches hold its output) are replaced with their history replayed, and
        the step runs again: the caller only gets output that passed. Sessions with LoRA are not checked (the
        references would run without it), nor are sessions with a server-hosted adapter."""
        if self.lora is not None or self.adapter is not None:
            return out
        while True:
            assert self._view is not None
            outs = [link.history[-1] for link in self._links[1:]] + [out]
            for i, link in enumerate(self._links):
                if not self.router.spot.wants():
                    continue
                error = await self.router.spot.check_hop(
                    self._view,
                    link.hop,
                    torch.cat(link.history, dim=1),
                    outs[i],
                    mask,
                    slice_prompts(self.prompts, self.start, link.hop),
                    codec=self.codec,
                    allowed=self.allowed,
                    blocked=self.blocked,
                    timeout=self.step_timeout,
                )
                if error is not None:
                    break
            else:
                return out
            failures.append(error)
            if len(failures) > self.max_retries:
                raise gave_up(f"inference step at position {self.position}", len(failures), error) from error
            for link in self._links:
                link.trim(self.position)
            old = self._links[i:]
            await _close_links(old)
            self._links[i:] = await self._open_range(old[0].hop.start, old[-1].hop.end, old[0].replay_input(), failures)
            self.failovers += 1
            x = hidden.detach().clone()
            if self.push and any(self._pushes(j) for j in range(len(self._links) - 1)):
                out = await self._step_push(x, mask, failures)
            else:
                out = await self._step_plain(x, mask, failures)

    # --- end of spot checks ------------------------------------------------------------------------------------

    async def _replace(self, i: int, failures: list[BaseException]) -> None:
        """Swap hop ``i`` for a fresh chain over exactly its blocks, replaying its history there."""
        old = self._links[i]
        await _close_links([old])
        log.info(
            "server %s failed for blocks [%d, %d) at position %d; replaying %d step(s) elsewhere",
            old.hop.peer_id,
            old.hop.start,
            old.hop.end,
            self.position,
            len(old.history),
        )
        new = await self._open_range(old.hop.start, old.hop.end, old.replay_input(), failures)
        self._links[i : i + 1] = new
        self.failovers += 1

    async def close(self) -> None:
        """Close every hop's stream (the servers free their caches). Idempotent."""
        self._closed = True
        links, self._links = self._links, []
        await _close_links(links)

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _close_links(links: list[_Link]) -> None:
    for link in links:
        try:
            await link.remote.close()
        except Exception as e:  # noqa: BLE001 - the server may already be gone; its cache times out there
            log.debug("closing the session on %s: %s", link.hop.peer_id, e)
