"""Placement policy, pure (no I/O, no torch): which span a server takes and when it should move (paper §3.2).

Everything here reads the DHT entries of a model's block keys, already fetched, and returns numbers or spans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from petal.daemon.serving.errors import ServeError
from petal.protocol.records import DRAINING, OFFLINE, ServerRecord

Entries = Mapping[int, Sequence[object]]
"""Block index -> what its key holds: DHT entries (with `peer_id` and `value`) or bare announced values."""


def parse_blocks(text: str, total: int) -> tuple[int, int]:
    """`"A:B"` -> (A, B), checked against the model's `total` blocks."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ServeError(f"--blocks {text!r}: use START:END, e.g. 0:10") from None
    if not 0 <= a < b <= total:
        raise ServeError(f"--blocks {text!r}: the model has blocks 0..{total - 1}; choose START < END <= {total}")
    return a, b


def block_throughputs(entries_by_block: Entries, total: int, exclude_peer: str = "") -> list[float]:
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
            record = ServerRecord.parse(value, str(peer))
            if record is not None and record.state not in (OFFLINE, DRAINING) and record.throughput > 0:
                out[block] += record.throughput
    return out


def choose_span(entries_by_block: Entries, num_blocks: int, total: int) -> tuple[int, int]:
    """The `num_blocks` consecutive blocks where the swarm is weakest (see `weakest_window`)."""
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
    entries_by_block: Entries,
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
