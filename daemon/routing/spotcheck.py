"""Trust: spot checks of the activations servers return, swarm-wide verification, and signed mismatch reports.

Any server can return garbage (a bug, a wrong model file, on purpose), and nothing in a reply proves it is right. So a
client re-runs a random fraction (``rate``, default ``DEFAULT_RATE``) of the hops of its inference steps and forward
calls on a second server of the same blocks, or on this daemon's own blocks when it hosts them (``LocalForward``: a
trusted reference), and compares the two outputs with a tolerance fitted to the dtypes, weight quantization and wire
codec involved (``tolerance_for``): relative L2 distance and top-k agreement of the hidden states, never exact
equality (``compare``, pure). When the two disagree, a third opinion decides (this daemon's blocks, else a third
server: ``judge`` takes the majority); with no third opinion both are suspect. A server found wrong is banned with
the usual backoff, counted, logged, and reported in the DHT (``MismatchReport``, signed, expiring, one entry per
signer per server); the caller's step or call runs again elsewhere, so it only sees output that passed.

An inference step is checked statelessly: the hop's whole input so far (the session keeps it for failover anyway)
goes to the reference as one ``forward``, and the last positions of its output are compared with the step's.

``verify_swarm`` is the same comparison on demand for every server of a model (``petalctl verify``): each stretch of
blocks between span boundaries gets the same seeded probe input on every server covering it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import Transport
from petal.daemon.routing.chains import Hop
from petal.daemon.routing.faults import is_server_fault
from petal.daemon.routing.remote import RemoteSpan
from petal.daemon.routing.swarm import ServerInfo, SwarmView
from petal.protocol.errors import PetalError
from petal.protocol.messages import LOSSLESS_CODEC
from petal.protocol.records import REPORT_TTL, MismatchReport, RecordError, report_key

log = logging.getLogger("petal.trust")

DEFAULT_RATE = 0.01
"""Fraction of hops re-run elsewhere by default: about one extra hop run per hundred (see docs/benchmarks.md)."""
TOP_K = 8
"""Hidden dimensions (largest magnitude, per token) whose sets are compared by ``compare``."""
MAX_CHECK_BYTES = 16 * 1024 * 1024
"""A hop's input larger than this (a long session's history) is not re-run: a check must stay cheap."""
MAX_REMEMBERED = 4096
"""Peers the checker keeps counters of; past it the counts start over (forged records cannot grow it)."""
VERIFY_TOKENS = 8
"""Tokens of the probe ``verify_swarm`` sends each stretch of blocks."""
VERIFY_CONCURRENCY = 8

# Relative L2 error each source adds (measured loosely; a liar's noise is orders of magnitude above these)
_DTYPE_ERROR = {"float32": 5e-3, "float16": 2e-2, "bfloat16": 6e-2}
_QUANT_ERROR = {"": 0.0, "none": 0.0, "int8": 0.15}
_CODEC_ERROR = {"none": 0.0, "float16": 2e-3, "bfloat16": 1e-2, "q8": 3e-2}

LocalForward = Callable[
    [str, str, int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None], Awaitable[torch.Tensor | None]
]
"""``(model, fingerprint, start, end, hidden, mask, prompts)``: blocks [start, end) run by this daemon's own server,
or None when it does not host them (then the reference is another server)."""


@dataclass(frozen=True)
class Tolerance:
    """How far two honest outputs of the same blocks may differ: most relative L2, least mean top-k agreement."""

    rel_l2: float
    topk: float


def tolerance_for(codec: str, dtypes: Iterable[str], quants: Iterable[str] = ()) -> Tolerance:
    """The tolerance for comparing outputs computed in ``dtypes`` with weights quantized as ``quants`` (the loosest
    of those involved counts), each sent through wire ``codec`` (counted twice: both outputs crossed it)."""
    dtype_err = max((_DTYPE_ERROR.get(d, _DTYPE_ERROR["bfloat16"]) for d in dtypes), default=_DTYPE_ERROR["float32"])
    quant_err = max((_QUANT_ERROR.get(q, _QUANT_ERROR["int8"]) for q in quants), default=0.0)
    rel = dtype_err + quant_err + 2 * _CODEC_ERROR.get(codec, _CODEC_ERROR["q8"])
    return Tolerance(rel_l2=rel, topk=0.75 if rel <= 1e-2 else 0.4)


@dataclass(frozen=True)
class Agreement:
    """How close a candidate output is to a reference: relative L2 distance and mean top-k agreement per token."""

    rel_l2: float
    topk: float

    def within(self, tol: Tolerance) -> bool:
        return self.rel_l2 <= tol.rel_l2 and self.topk >= tol.topk

    def to_json(self) -> dict[str, float]:
        return {"rel_l2": round(self.rel_l2, 6), "topk": round(self.topk, 4)}


def compare(reference: torch.Tensor, candidate: torch.Tensor, k: int = TOP_K) -> Agreement:
    """``||candidate - reference|| / ||reference||`` and the mean fraction of each token's ``k`` largest-magnitude
    hidden dimensions that both share. Different shapes or non-finite values are total disagreement."""
    if tuple(reference.shape) != tuple(candidate.shape) or reference.dim() < 1:
        return Agreement(float("inf"), 0.0)
    ref = reference.detach().float()
    cand = candidate.detach().float()
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(cand).all())):
        return Agreement(float("inf"), 0.0)
    norm = float(ref.norm())
    diff = float((cand - ref).norm())
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    k = max(1, min(k, ref.shape[-1]))
    a = ref.abs().reshape(-1, ref.shape[-1]).topk(k, dim=-1).indices
    b = cand.abs().reshape(-1, cand.shape[-1]).topk(k, dim=-1).indices
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return Agreement(rel, float(shared.mean()))


@dataclass(frozen=True)
class Verdict:
    """One server's standing after a comparison: ``pass``, ``fail``, ``disputed`` (no majority to tell who is
    wrong) or ``unchecked`` (nothing to compare with); ``agreement`` against the reference it was judged by."""

    verdict: str
    agreement: Agreement | None = None
    reference: str | None = None  # "local", or the peer id whose output served as the reference


def judge(outputs: Mapping[str, torch.Tensor], tol: Tolerance, local: torch.Tensor | None = None) -> dict[str, Verdict]:
    """Verdicts for servers that ran the same blocks on the same input (pure).

    With ``local`` (this daemon's own output: trusted) each is judged against it. Otherwise the output that agrees
    with most others (ties: closest to the rest) is the reference; it and those agreeing with it pass if they are a
    strict majority, the others fail; without a majority everyone who disagrees is ``disputed``.
    """
    if local is not None:
        out = {}
        for peer, x in outputs.items():
            ag = compare(local, x)
            out[peer] = Verdict("pass" if ag.within(tol) else "fail", ag, "local")
        return out
    peers = list(outputs)
    if len(peers) < 2:
        return {p: Verdict("unchecked") for p in peers}
    pair = {(p, q): compare(outputs[p], outputs[q]) for p in peers for q in peers if p != q}

    def score(p: str) -> tuple[int, float]:
        agree = sum(pair[(p, q)].within(tol) for q in peers if q != p)
        return agree, -sum(pair[(p, q)].rel_l2 for q in peers if q != p)

    center = max(peers, key=score)
    group = {center} | {q for q in peers if q != center and pair[(center, q)].within(tol)}
    verdicts = {}
    for p in peers:
        ag = Agreement(0.0, 1.0) if p == center else pair[(center, p)]
        if 2 * len(group) > len(peers):
            verdicts[p] = Verdict("pass" if p in group else "fail", ag, center)
        else:
            verdicts[p] = Verdict("disputed" if len(group) < len(peers) else "pass", ag, center)
    return verdicts


class Routing(Protocol):
    """What the checker uses of ``petal.daemon.routing.router.Router`` (which owns it)."""

    transport: Transport
    dht: SwarmDHT
    rng: random.Random

    def candidates(
        self, view: SwarmView, allowed: Iterable[str] | None = None, blocked: Iterable[str] | None = None
    ) -> list[ServerInfo]: ...

    def span(self, view: SwarmView, hop: Hop, codec: str | None = None) -> RemoteSpan: ...

    def codec_for(self, server: ServerInfo, requested: str | None = None) -> str: ...

    def ban(self, peer_id: str, reason: object = "") -> None: ...


@dataclass(frozen=True)
class SeenReport:
    """A verified mismatch report read from the DHT, with its signer and lifetime."""

    signer: str
    report: MismatchReport
    issued_at: float
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "signer": self.signer,
            "start": r.start,
            "end": r.end,
            "rel_l2": r.rel_l2,
            "topk": r.topk,
            "how": r.how,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }


async def read_reports(dht: SwarmDHT, model: str, peer_ids: Iterable[str]) -> dict[str, list[SeenReport]]:
    """The mismatch reports about each of ``peer_ids`` (only those with some), one per signer (the DHT keeps one
    entry per signer per key); reports a server signed about itself, or about another server than their key's, are
    dropped."""
    keys = {report_key(model, p): p for p in peer_ids}
    if not keys:
        return {}
    found = await dht.get_many(list(keys))
    out: dict[str, list[SeenReport]] = {}
    for key, entries in found.items():
        peer = keys[key]
        for e in entries:
            report = MismatchReport.parse(e.value)
            if report is None or report.peer_id != peer or e.peer_id == peer:
                continue
            out.setdefault(peer, []).append(SeenReport(e.peer_id, report, e.issued_at, e.expires_at))
    return out


async def publish_report(dht: SwarmDHT, model: str, report: MismatchReport, ttl: float = REPORT_TTL) -> bool:
    """Sign and store a mismatch report about ``report.peer_id``; False (logged) if the DHT did not take it."""
    try:
        return await dht.announce(report_key(model, report.peer_id), report.to_value(), ttl) > 0
    except (RecordError, OSError, TimeoutError, RuntimeError) as e:
        log.info("could not publish a mismatch report about %s: %s", report.peer_id, e)
        return False


@dataclass
class SpotChecker:
    """The client side of spot checks for one router: the policy (``rate``), the reference choice, the counters.

    ``local_forward``: this daemon's own blocks (a trusted reference when it hosts the checked ones).
    ``report``: publish a signed mismatch report about each server found wrong (at most one per ``REPORT_TTL / 3``).
    """

    router: Routing
    rate: float = DEFAULT_RATE
    local_forward: LocalForward | None = None
    report: bool = True
    checks: int = 0  # hops re-run and compared
    mismatches: int = 0  # comparisons that disagreed
    unchecked: int = 0  # hops drawn for a check that had no reference (no other server, or it failed)
    caught: dict[str, int] = field(default_factory=dict)  # peer -> times found wrong (and banned)
    _used: dict[str, int] = field(default_factory=dict)  # peer -> times used as a reference (round robin)
    _reported: dict[tuple[str, str], float] = field(default_factory=dict)
    _tasks: set[asyncio.Task[bool]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"spot-check rate {self.rate!r}: use a fraction in [0, 1] (0 disables)")

    def wants(self) -> bool:
        """Whether to check the next hop (drawn at ``rate``)."""
        return self.rate > 0 and (self.rate >= 1.0 or self.router.rng.random() < self.rate)

    def stats(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "checks": self.checks,
            "mismatches": self.mismatches,
            "unchecked": self.unchecked,
            "caught": dict(self.caught),
        }

    async def check_hop(
        self,
        view: SwarmView,
        hop: Hop,
        inputs: torch.Tensor,
        output: torch.Tensor,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        *,
        codec: str | None = None,
        allowed: Iterable[str] | None = None,
        blocked: Iterable[str] | None = None,
        timeout: float = 60.0,
    ) -> PetalError | None:
        """Re-run ``hop`` on ``inputs`` (its whole input: ``[B, T, H]``) elsewhere and compare with ``output`` (its
        output for the last ``output.shape[1]`` positions); callers draw first with ``wants``. Returns the error to
        count when the hop's server was found wrong (it is banned already: run the hop again); None when it passed
        or could not be checked. Servers found wrong as references are banned too."""
        if hop.peer_id == self.router.transport.peer_id:
            return None
        if inputs.numel() * inputs.element_size() > MAX_CHECK_BYTES:
            return None
        verdicts = await self.check(view, hop, inputs, output, mask, prompts, codec, allowed, blocked, timeout)
        if verdicts is None:
            return None
        mine = verdicts[hop.peer_id]
        if mine.verdict not in ("fail", "disputed"):
            return None
        ag = mine.agreement or Agreement(float("inf"), 0.0)
        return PetalError(
            "unavailable",
            f"server {hop.peer_id} returned wrong activations for blocks {hop.start}..{hop.end} of {view.model} "
            f"(relative L2 {ag.rel_l2:.3g}, top-k agreement {ag.topk:.2f} against {mine.reference}); it is banned "
            "and the work ran again elsewhere",
        )

    async def check(
        self,
        view: SwarmView,
        hop: Hop,
        inputs: torch.Tensor,
        output: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
        codec: str | None,
        allowed: Iterable[str] | None,
        blocked: Iterable[str] | None,
        timeout: float,
    ) -> dict[str, Verdict] | None:
        """Re-run and judge ``hop`` now (no draw); None when no reference could be had. Bans, counts and reports
        the servers found wrong."""
        allowed = None if allowed is None else list(allowed)
        blocked = list(blocked or ())
        t = output.shape[1]
        wire = self.router.codec_for(hop.server, codec)
        involved = [hop.server]
        outputs = {hop.peer_id: output}
        local = await self.local_reference(view, hop, inputs, mask, prompts)
        if local is None:
            ref = self._pick(view, hop, allowed, blocked, {hop.peer_id})
            ref_out = None if ref is None else await self._run(view, ref, hop, inputs, mask, prompts, codec, timeout)
            if ref is None or ref_out is None:
                self.unchecked += 1
                return None
            involved.append(ref)
            outputs[ref.peer_id] = ref_out[:, -t:]
            tol = tolerance_for(wire, [s.dtype for s in involved], [s.quant for s in involved])
            self.checks += 1
            if compare(outputs[ref.peer_id], output).within(tol):
                return {p: Verdict("pass", compare(outputs[ref.peer_id], x), ref.peer_id) for p, x in outputs.items()}
            self.mismatches += 1
            # two servers disagree: a third server decides (with none, both are suspect)
            third = self._pick(view, hop, allowed, blocked, set(outputs))
            third_out = (
                None if third is None else await self._run(view, third, hop, inputs, mask, prompts, codec, timeout)
            )
            if third is not None and third_out is not None:
                involved.append(third)
                outputs[third.peer_id] = third_out[:, -t:]
        else:
            self.checks += 1
        tol = tolerance_for(wire, [s.dtype for s in involved], [s.quant for s in involved])
        verdicts = judge(outputs, tol, None if local is None else local[:, -t:])
        if local is not None and verdicts[hop.peer_id].verdict == "fail":
            self.mismatches += 1
        for peer, v in verdicts.items():
            if v.verdict in ("fail", "disputed"):
                self._caught(view, hop, peer, v)
        return verdicts

    def _caught(self, view: SwarmView, hop: Hop, peer: str, v: Verdict) -> None:
        ag = v.agreement or Agreement(float("inf"), 0.0)
        log.warning(
            "spot check: server %s %s for blocks [%d, %d) of %s (relative L2 %.3g, top-k agreement %.2f against %s)",
            peer,
            "returned wrong activations" if v.verdict == "fail" else "disagrees and no third opinion can tell who is",
            hop.start,
            hop.end,
            view.model,
            ag.rel_l2,
            ag.topk,
            v.reference,
        )
        self.router.ban(peer, f"spot check {v.verdict}: relative L2 {ag.rel_l2:.3g}")
        if len(self.caught) >= MAX_REMEMBERED:
            self.caught.clear()
        self.caught[peer] = self.caught.get(peer, 0) + 1
        if v.verdict == "fail" and self.report:
            self.publish(view.model, MismatchReport(peer, hop.start, hop.end, min(ag.rel_l2, 1e9), ag.topk, "spot"))

    def publish(self, model: str, report: MismatchReport) -> None:
        """Publish ``report`` in the background, at most once per server and model every ``REPORT_TTL / 3``."""
        now = time.monotonic()
        key = (model, report.peer_id)
        if now - self._reported.get(key, -REPORT_TTL) < REPORT_TTL / 3:
            return
        if len(self._reported) >= MAX_REMEMBERED:
            self._reported.clear()
        self._reported[key] = now
        task = asyncio.get_running_loop().create_task(publish_report(self.router.dht, model, report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick(
        self, view: SwarmView, hop: Hop, allowed: list[str] | None, blocked: list[str], exclude: set[str]
    ) -> ServerInfo | None:
        """A reference server for ``hop``'s blocks: usable by the request, not excluded, the least used so far (so
        successive checks compare against every server of the blocks in turn)."""
        usable = [
            s
            for s in self.router.candidates(view, allowed, blocked)
            if s.covers(hop.start, hop.end) and s.peer_id not in exclude
        ]
        if not usable:
            return None
        least = min(self._used.get(s.peer_id, 0) for s in usable)
        pick = self.router.rng.choice([s for s in usable if self._used.get(s.peer_id, 0) == least])
        if len(self._used) >= MAX_REMEMBERED:
            self._used.clear()
        self._used[pick.peer_id] = self._used.get(pick.peer_id, 0) + 1
        return pick

    async def _run(
        self,
        view: SwarmView,
        server: ServerInfo,
        hop: Hop,
        inputs: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
        codec: str | None,
        timeout: float,
    ) -> torch.Tensor | None:
        """``hop``'s blocks on ``server`` (a forward over the whole input); None if it failed (banned if its fault)."""
        try:
            return await self.router.span(view, Hop(server, hop.start, hop.end), codec).forward(
                inputs, mask, prompts, timeout=timeout
            )
        except Exception as e:  # noqa: BLE001 - a reference that fails leaves the hop unchecked, never the caller failed
            log.info("spot check: reference %s failed for blocks [%d, %d): %s", server.peer_id, hop.start, hop.end, e)
            if is_server_fault(e):
                self.router.ban(server.peer_id, f"spot-check reference failed: {e}")
            return None

    async def local_reference(
        self,
        view: SwarmView,
        hop: Hop,
        inputs: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """``hop``'s blocks run by this daemon's own server (trusted), or None when it does not host them."""
        if self.local_forward is None or view.fingerprint is None:
            return None
        try:
            return await self.local_forward(view.model, view.fingerprint, hop.start, hop.end, inputs, mask, prompts)
        except Exception as e:  # noqa: BLE001 - our own blocks busy or gone: fall back to another server
            log.info("spot check: this daemon's own blocks [%d, %d) failed: %s", hop.start, hop.end, e)
            return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def verify_swarm(
    checker: SpotChecker,
    view: SwarmView,
    *,
    tokens: int = VERIFY_TOKENS,
    seed: int = 0,
    timeout: float = 60.0,
    report: bool = False,
) -> dict[str, Any]:
    """Send the same probe inputs to every server of every stretch of ``view``'s blocks (and to this daemon's own
    blocks where it hosts them) and judge each server (see ``judge``); banned servers are checked too.

    Stretches run between consecutive span boundaries, so servers with different spans are compared on the blocks
    they share. Probes are seeded random hidden states (unit RMS), sent lossless. With ``report``, a signed mismatch
    report is published about each server that fails. Returns the JSON of ``POST /v1/verify``.
    """
    router = checker.router
    servers = sorted(view.servers.values(), key=lambda s: (s.start, s.end, s.peer_id))
    if not servers:
        raise PetalError("not_found", f"no server announces blocks of {view.model}; nothing to verify")
    hidden = await _hidden_size(router, view, servers, timeout)
    bounds = sorted({b for s in servers for b in (s.start, s.end)})
    stretches = [(a, b) for a, b in itertools.pairwise(bounds) if any(s.covers(a, b) for s in servers)]
    gate = asyncio.Semaphore(VERIFY_CONCURRENCY)

    async def run(server: ServerInfo, a: int, b: int, x: torch.Tensor) -> torch.Tensor | BaseException:
        async with gate:
            try:
                span = router.span(view, Hop(server, a, b), LOSSLESS_CODEC)
                return await span.forward(x, None, None, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - an unreachable server is a row of the table, not a failed verify
                return e

    rows: dict[str, dict[str, Any]] = {
        s.peer_id: {"peer_id": s.peer_id, "start": s.start, "end": s.end, "segments": []} for s in servers
    }
    used_local = False
    for a, b in stretches:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + a)
        x = torch.randn(1, tokens, hidden, generator=gen)
        here = [s for s in servers if s.covers(a, b)]
        results = await asyncio.gather(*(run(s, a, b, x) for s in here))
        local = await checker.local_reference(view, Hop(here[0], a, b), x, None, None)
        used_local = used_local or local is not None
        outputs = {s.peer_id: r for s, r in zip(here, results, strict=True) if isinstance(r, torch.Tensor)}
        tol = tolerance_for(LOSSLESS_CODEC, [s.dtype for s in here], [s.quant for s in here])
        verdicts = judge(outputs, tol, local)
        for s, r in zip(here, results, strict=True):
            seg: dict[str, Any] = {"start": a, "end": b}
            if isinstance(r, BaseException):
                seg.update(verdict="unreachable", error=str(r)[:300])
            else:
                v = verdicts[s.peer_id]
                seg.update(verdict=v.verdict, reference=v.reference)
                if v.agreement is not None:
                    seg.update(v.agreement.to_json())
                if v.verdict == "fail" and report:
                    ag = v.agreement or Agreement(float("inf"), 0.0)
                    await publish_report(
                        router.dht, view.model, MismatchReport(s.peer_id, a, b, min(ag.rel_l2, 1e9), ag.topk, "verify")
                    )
            rows[s.peer_id]["segments"].append(seg)
    for row in rows.values():
        row.update(_overall(row["segments"]))
    return {
        "model": view.model,
        "fingerprint": view.fingerprint,
        "tokens": tokens,
        "seed": seed,
        "local_reference": used_local,
        "servers": list(rows.values()),
    }


def _overall(segments: list[dict[str, Any]]) -> dict[str, Any]:
    """A server's verdict over its stretches: the worst one (a pass next to unchecked stretches is a pass), and its
    worst agreement."""
    order = ["fail", "disputed", "unreachable", "pass", "unchecked"]
    verdicts = {s["verdict"] for s in segments}
    verdict = next((v for v in order if v in verdicts), "unchecked")
    rel = [s["rel_l2"] for s in segments if "rel_l2" in s]
    topk = [s["topk"] for s in segments if "topk" in s]
    return {
        "verdict": verdict,
        "rel_l2": max(rel) if rel else None,
        "topk": min(topk) if topk else None,
    }


async def _hidden_size(router: Routing, view: SwarmView, servers: list[ServerInfo], timeout: float) -> int:
    """The model's hidden size, from the first server that answers ``info``."""
    errors = []
    for s in servers[:4]:
        try:
            info = await router.span(view, Hop(s, s.start, s.end), LOSSLESS_CODEC).info(timeout=min(timeout, 10.0))
            return int(info.hidden_size)
        except Exception as e:  # noqa: BLE001 - try the next server
            errors.append(f"{s.peer_id}: {e}")
    raise PetalError("unavailable", f"no server of {view.model} answered info ({'; '.join(errors)}); try again later")
