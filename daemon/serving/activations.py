"""Activations a server keeps between a training forward and its backward (`ActivationStore`), so the backward runs
only `torch.autograd.grad` on the kept graph instead of running the span's forward again.

A forward asked with ``keep`` runs with grad enabled; its graph (inputs and LoRA weights as leaves, the output, and
the tensors autograd saved) is kept here under a random 128-bit id bound to the requesting peer. Memory is bounded:
a byte budget (`ServeSettings.activation_budget`) shared by all peers, at most ``peer_share`` of it per peer (its own
oldest entries go first), least recently kept first otherwise, and a TTL. An entry leaves on its backward, eviction,
expiry or server stop; a backward that finds nothing falls back to recomputing, so losing an entry costs time, never
a wrong result. Used only from the asyncio loop (the compute thread builds entries and consumes the taken ones).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

DEFAULT_TTL_S = 60.0
MIN_DEFAULT_BUDGET = 1 << 30
"""The default budget is the larger of this and a quarter of the KV budget's bytes (measured: a 10-block SmolLM2
span keeps 0.31 MiB per token in float32, 45 MiB for 1x144 tokens, so a peer's half holds an 8x128 batch)."""


@dataclass
class Kept:
    """One kept forward: its graph (output and leaves) and what a backward must match to reuse it."""

    start: int
    end: int
    output: torch.Tensor
    inputs: list[torch.Tensor]  # hidden, then prompts when sent: leaves that require grad
    lora: dict[str, torch.Tensor]  # the client's LoRA weights on this device: leaves that require grad
    nbytes: int
    peer: str = ""
    born: float = field(default_factory=time.monotonic)

    def matches(self, start: int, end: int, shapes: list[tuple[int, ...]], lora: dict[str, tuple[int, ...]]) -> bool:
        """Whether a backward of [start, end) with these input shapes and LoRA keys/shapes can reuse this graph."""
        return (
            (start, end) == (self.start, self.end)
            and shapes == [tuple(t.shape) for t in self.inputs]
            and lora == {k: tuple(t.shape) for k, t in self.lora.items()}
        )


class ActivationStore:
    """Kept forwards by id: bounded by ``budget`` bytes in all, ``peer_share`` of it per peer, and ``ttl`` seconds."""

    def __init__(
        self,
        budget: int,
        *,
        peer_share: float = 0.5,
        ttl: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget < 0 or not 0 < peer_share <= 1:
            raise ValueError(f"need budget >= 0 and peer_share in (0, 1], got {budget}, {peer_share}")
        self.budget = budget
        self.peer_share = peer_share
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[str, Kept] = OrderedDict()  # oldest first
        self.nbytes = 0
        self.kept = 0  # entries stored
        self.refused = 0  # forwards asked to keep whose graph did not fit a peer's share
        self.evicted = 0  # entries dropped for room or by TTL before their backward
        self.reused = 0  # backwards that found their entry

    def __len__(self) -> int:
        return len(self._entries)

    def held(self, peer: str) -> int:
        """Bytes kept for ``peer`` now."""
        return sum(e.nbytes for e in self._entries.values() if e.peer == peer)

    def put(self, peer: str, entry: Kept) -> str | None:
        """Keep ``entry`` for ``peer``: its id, or None when it is larger than a peer's share (not kept)."""
        self.sweep()
        share = int(self.peer_share * self.budget)
        if entry.nbytes > share:
            self.refused += 1
            return None
        entry.peer, entry.born = peer, self.clock()
        while self.held(peer) + entry.nbytes > share:
            self._drop(next(k for k, e in self._entries.items() if e.peer == peer))
        while self.nbytes + entry.nbytes > self.budget:
            self._drop(next(iter(self._entries)))
        key = secrets.token_hex(16)
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        self.kept += 1
        return key

    def take(self, peer: str, key: str, fits: Callable[[Kept], bool] = lambda _: True) -> Kept | None:
        """The entry ``key`` of ``peer``, removed (a graph serves one backward); None if absent, expired or another
        peer's (that one stays), or if it does not ``fit`` the backward (dropped: that peer asked for it)."""
        self.sweep()
        entry = self._entries.get(key)
        if entry is None or entry.peer != peer:
            return None
        del self._entries[key]
        self.nbytes -= entry.nbytes
        if not fits(entry):
            return None
        self.reused += 1
        return entry

    def sweep(self) -> int:
        """Drop the entries older than the TTL; returns how many."""
        cutoff = self.clock() - self.ttl
        old = [k for k, e in self._entries.items() if e.born < cutoff]
        for key in old:
            self._drop(key)
        return len(old)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        self.evicted += 1

    def stats(self) -> dict[str, int]:
        """Counters for the server's status."""
        return {
            "activations_bytes": self.nbytes,
            "activations_kept": self.kept,
            "activations_reused": self.reused,
            "activations_evicted": self.evicted,
            "activations_refused": self.refused,
        }


@contextmanager
def saved_bytes(exclude: set[int]) -> Iterator[list[int]]:
    """Within the ``with``, sum the bytes of the tensors autograd saves for backward (each storage once; storages
    whose data pointer is in ``exclude``, such as the weights, not at all) into the yielded one-item list."""
    total = [0]
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in exclude:
            seen.add(ptr)
            total[0] += storage.nbytes()
        return t.detach()  # the tensor itself would make a reference cycle through its grad_fn (freed only by gc)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
