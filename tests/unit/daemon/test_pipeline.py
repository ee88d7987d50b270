"""Pipelined forwards (`calls.forward` with micro-batches, `chains.pipeline_parts`) against spans that record what
they run: each server gets the micro-batches one at a time and in order, the chain's servers run at the same time,
the output is every row's, and a server that fails mid-pipeline is banned and its micro-batch runs elsewhere."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import cast

import pytest
import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.routing import calls
from petal.daemon.routing.chains import Hop, pipeline_parts
from petal.daemon.routing.router import Router
from petal.daemon.routing.swarm import SwarmView
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY, Entry, ModelRecord, ServerRecord, block_key

FP = "FP"
N = 6


def test_pipeline_parts_cover_the_batch_in_near_equal_contiguous_parts():
    assert pipeline_parts(8, 128, 3) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8)]  # 2 x hops at most
    assert pipeline_parts(8, 128, 1) == [(0, 8)]  # one server: nothing to overlap
    assert pipeline_parts(8, 128, 0) == [(0, 8)]
    assert pipeline_parts(1, 4096, 3) == [(0, 1)]  # rows are never cut
    assert pipeline_parts(4, 16, 3) == [(0, 4)]  # 64 tokens: too small to split at 128 a part
    assert pipeline_parts(8, 32, 3) == [(0, 4), (4, 8)]
    for rows in range(1, 40):
        for hops in range(4):
            parts = pipeline_parts(rows, 100, hops, min_tokens=100)
            assert parts[0][0] == 0 and parts[-1][1] == rows
            assert all(p[1] == q[0] and p[0] < p[1] for p, q in itertools.pairwise(parts))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1 and len(parts) <= max(1, 2 * hops)
    with pytest.raises(ValueError):
        pipeline_parts(0, 8, 3)


def _entry(peer: str, value: dict) -> Entry:
    now = time.time()
    return Entry(peer_id=peer, public_key=b"", value=value, issued_at=now, expires_at=now + 60)


class _DHT:
    """Three servers cutting N blocks in thirds (and ``spare`` covering the middle third too)."""

    def __init__(self, spare: bool) -> None:
        cuts = [("s0", 0, 2), ("s1", 2, 4), ("s2", 4, 6)] + ([("spare", 2, 4)] if spare else [])
        self.entries: dict[str, list[Entry]] = {MODELS_KEY: [_entry("s0", ModelRecord("m", FP, N, "llama").to_value())]}
        for peer, a, b in cuts:
            value = ServerRecord((), a, b, "online", 5.0, 64, "float32", 1, fingerprint=FP).to_value()
            for blk in range(a, b):
                self.entries.setdefault(block_key("m", blk), []).append(_entry(peer, value))

    async def get(self, key: str) -> list[Entry]:
        return self.entries.get(key, [])


class _Span:
    """A hop that adds its block count to every row, after a short sleep; logs (peer, event, first row value)."""

    def __init__(self, hop: Hop, log: list[tuple[str, str, float]], busy: dict[str, int], fail: set[str]) -> None:
        self.hop, self.log, self.busy, self.fail = hop, log, busy, fail

    async def forward(self, hidden, mask=None, prompts=None, timeout=60.0, lora=None):  # type: ignore[no-untyped-def]
        peer = self.hop.peer_id
        self.busy[peer] = self.busy.get(peer, 0) + 1
        self.log.append((peer, "start", float(hidden[0, 0, 0])))
        try:
            assert self.busy[peer] == 1, f"{peer} got two micro-batches at once"
            await asyncio.sleep(0.02)
            if peer in self.fail:
                self.fail.discard(peer)
                raise ConnectionError(f"{peer} died")
            return hidden + (self.hop.end - self.hop.start)
        finally:
            self.busy[peer] -= 1
            self.log.append((peer, "end", float(hidden[0, 0, 0])))

    async def forward_keep(self, hidden, mask=None, prompts=None, timeout=60.0, lora=None, *, keep=True):  # type: ignore[no-untyped-def]
        return await self.forward(hidden), f"kept-{float(hidden[0, 0, 0])}"

    async def backward(self, hidden, grad, mask=None, prompts=None, timeout=60.0, lora=None, activation=None):  # type: ignore[no-untyped-def]
        """d(hidden + blocks)/d(hidden) = 1: the gradient passes through (one backward at a time per server; a
        re-run forward may be queued beside it, as on a real server)."""
        peer = self.hop.peer_id + "/back"
        self.busy[peer] = self.busy.get(peer, 0) + 1
        self.log.append((self.hop.peer_id, "back", float(hidden[0, 0, 0])))
        try:
            assert self.busy[peer] == 1, f"{peer} got two micro-batches at once"
            assert activation in (None, f"kept-{float(hidden[0, 0, 0])}"), "not the graph its forward kept"
            await asyncio.sleep(0.02)
            return grad.clone(), None, None
        finally:
            self.busy[peer] -= 1
            self.log.append((self.hop.peer_id, "back-end", float(hidden[0, 0, 0])))


def _router(spare: bool, log: list, fail: set[str], min_tokens: int) -> Router:
    router = Router(None, cast(SwarmDHT, _DHT(spare)), max_age=0.0, max_stale=0.0, pipeline_min_tokens=min_tokens)  # type: ignore[arg-type]
    busy: dict[str, int] = {}

    def span(view: SwarmView, hop: Hop, codec: str | None = None, adapter: str | None = None) -> _Span:
        return _Span(hop, log, busy, fail)

    router.span = span  # type: ignore[method-assign,assignment]
    return router


async def test_micro_batches_pass_each_server_in_order_one_at_a_time_while_the_servers_overlap():
    log: list[tuple[str, str, float]] = []
    router = _router(False, log, set(), min_tokens=4)
    x = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 4, 3).contiguous()  # row r holds r
    out = await calls.forward(router, "m", x)
    assert torch.equal(out, x + N)
    _assert_pipelined(log, "start")


def _assert_pipelined(log: list[tuple[str, str, float]], begin: str) -> None:
    """Each server began (``begin`` events) the six micro-batches (2 x 3 hops) in order, by their first row (each hop
    adds its block count), and two servers were computing at some moment."""
    for peer, before in (("s0", 0), ("s1", 2), ("s2", 4)):
        assert [v - before for p, e, v in log if p == peer and e == begin] == [0, 2, 4, 5, 6, 7]
    running: set[str] = set()
    overlapped = False
    for peer, event, _ in log:
        running.add(peer) if event == begin else running.discard(peer)
        overlapped |= len(running) > 1
    assert overlapped, f"the servers of the chain never ran at the same time ({begin})"


async def test_a_kept_forward_and_its_backward_run_as_pipelines_in_opposite_directions():
    log: list[tuple[str, str, float]] = []
    router = _router(False, log, set(), min_tokens=4)
    x = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 4, 3).contiguous()
    out, chain = await calls.forward_kept(router, "m", x)
    assert torch.equal(out, x + N) and len(chain.pieces) == 6
    log.clear()
    grad = torch.randn(8, 4, 3)
    got, _, _ = await calls.backward(router, "m", x, grad, kept=chain)
    assert torch.equal(got, grad)
    assert next(p for p, e, _ in log if e == "back") == "s2"  # last hop first
    _assert_pipelined(log, "back")


async def test_a_backward_without_a_kept_forward_re_runs_it_as_a_pipeline_then_goes_back_as_one():
    log: list[tuple[str, str, float]] = []
    router = _router(False, log, set(), min_tokens=4)
    x = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 4, 3).contiguous()
    grad = torch.randn(8, 4, 3)
    got, _, _ = await calls.backward(router, "m", x, grad)
    assert torch.equal(got, grad)
    assert not any(p == "s2" and e == "start" for p, e, _ in log)  # the last hop's input is all the re-run needs
    for peer, before in (("s0", 0), ("s1", 2)):
        assert [v - before for p, e, v in log if p == peer and e == "start"] == [0, 2, 4, 5, 6, 7]
    for peer, before in (("s0", 0), ("s1", 2), ("s2", 4)):
        assert [v - before for p, e, v in log if p == peer and e == "back"] == [0, 2, 4, 5, 6, 7]


async def test_without_a_pipeline_the_whole_batch_runs_hop_after_hop():
    log: list[tuple[str, str, float]] = []
    out = await calls.forward(_router(False, log, set(), min_tokens=0), "m", torch.zeros(8, 4, 3))
    assert torch.equal(out, torch.full((8, 4, 3), float(N)))
    assert [(p, e) for p, e, _ in log] == [(f"s{i}", e) for i in range(3) for e in ("start", "end")]


async def test_a_server_failing_mid_pipeline_is_banned_and_its_micro_batch_runs_on_another():
    log: list[tuple[str, str, float]] = []
    fail = {"s1"}
    router = _router(True, log, fail, min_tokens=4)
    router.rng.seed(1)
    x = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 4, 3).contiguous()
    out = await calls.forward(router, "m", x)
    assert torch.equal(out, x + N)
    assert not fail, "s1 was never asked"
    assert router.bans.is_banned("s1")
    assert any(p == "spare" and e == "start" for p, e, _ in log)


async def test_a_callers_error_in_one_micro_batch_cancels_the_others_and_is_raised():
    log: list[tuple[str, str, float]] = []
    router = _router(False, log, set(), min_tokens=4)

    def refuse(view: SwarmView, hop: Hop, codec: str | None = None, adapter: str | None = None) -> object:
        class Refusing:
            async def forward(self, hidden, *a, **k):  # type: ignore[no-untyped-def]
                await asyncio.sleep(0.01)
                if float(hidden[0, 0, 0]) == 4:
                    raise PetalError("wrong_shape", "no")
                return hidden

        return Refusing()

    router.span = refuse  # type: ignore[method-assign,assignment]
    x = torch.arange(8, dtype=torch.float32)[:, None, None].expand(8, 4, 3).contiguous()
    with pytest.raises(PetalError, match="no"):
        await calls.forward(router, "m", x)
    await asyncio.sleep(0.05)
    assert not [t for t in asyncio.all_tasks() if "_forward_trace" in repr(t.get_coro())]
