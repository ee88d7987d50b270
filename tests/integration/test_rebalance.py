"""Rebalancing (paper §3.2): a server moves only where it closes a gap or clearly lifts the swarm's bottleneck."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from petal.daemon.serving.placement import should_move, weakest_window
from petal.kernels.store import open_model
from petal.protocol.records import block_key
from tests.support.blocks import tiny_llama
from tests.support.daemons import Swarm


def swarm_of(*servers: tuple[str, int, int, float], total: int = 6) -> dict[int, list[dict]]:
    """DHT-shaped entries: each server (peer, start, end, throughput) announced under each of its blocks."""
    out: dict[int, list] = {b: [] for b in range(total)}
    for peer, start, end, tp in servers:
        for b in range(start, end):
            value = {"a": [], "s": [start, end], "st": "online", "t": tp, "c": 10, "d": "float32", "v": 1}
            out[b].append(type("E", (), {"peer_id": peer, "value": value})())
    return out


def test_weakest_window_prefers_the_lowest_minimum_then_sum():
    assert weakest_window([5, 5, 1, 1, 9, 9], 2) == (2, 4)
    assert weakest_window([3, 0, 3, 3, 3, 0], 2) == (0, 2)  # ties on the minimum go to the lower sum, then earliest
    assert weakest_window([1, 2], 5) == (0, 2)


def test_redundant_server_moves_into_a_gap_and_needed_ones_stay():
    entries = swarm_of(("a", 0, 3, 10.0), ("d", 0, 3, 10.0))  # blocks 3..5 have nobody
    assert should_move(entries, "d", (0, 3), 10.0, 6) == (3, 6)
    alone = swarm_of(("a", 0, 3, 10.0), ("c", 3, 6, 10.0))
    assert should_move(alone, "a", (0, 3), 10.0, 6) is None  # moving would only open another gap
    gap_only = swarm_of(("a", 0, 3, 10.0))
    assert should_move(gap_only, "a", (0, 3), 10.0, 6) is None  # the only server cannot cover both halves


def test_moves_only_for_a_clear_gain():
    small = swarm_of(("a", 0, 3, 10.0), ("d", 0, 3, 10.0), ("c", 3, 6, 9.0))
    assert should_move(small, "d", (0, 3), 10.0, 6) is None  # bottleneck 9 -> 10 is under the 25% bar
    big = swarm_of(("a", 0, 3, 10.0), ("d", 0, 3, 10.0), ("c", 3, 6, 2.0))
    assert should_move(big, "d", (0, 3), 10.0, 6) == (3, 6)  # 2 -> 10


def served(daemon, name: str) -> list[int]:
    announced = set(daemon.status()["announced"])
    return [b for b in range(30) if block_key(name, b) in announced]


def test_stopping_a_server_makes_a_redundant_one_close_the_gap():
    root = Path(tempfile.mkdtemp(prefix="petal-rb-", dir="/tmp"))
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    name = open_model(model_dir).name
    swarm = Swarm(root)
    try:
        args = ("--serve", str(model_dir), "--num-blocks", "10", "--max-cache-tokens", "100", "--rebalance-period", "2")
        boot = swarm.start_bootstrap("r0", *args)
        daemons = [boot] + [swarm.join(f"r{i}", boot, *args) for i in range(1, 4)]
        spans = [served(d, name) for d in daemons]
        assert sorted(map(tuple, spans[:3])) == [tuple(range(10)), tuple(range(10, 20)), tuple(range(20, 30))]
        # the 4th duplicates one span; stop a server it does not duplicate, leaving a 10-block gap
        victim = next(d for d, s in zip(daemons[:3], spans[:3], strict=True) if s != spans[3])
        gap = served(victim, name)
        assert victim.stop() == 0
        live = [d for d in daemons if d is not victim]
        coverage = lambda: sorted(b for d in live for b in served(d, name))  # noqa: E731
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and set(coverage()) != set(range(30)):
            time.sleep(0.5)
        assert coverage() == list(range(30)), f"gap {gap} not closed: live servers cover {coverage()}"
        movers = [d for d in live if "moving from blocks" in d.log()]
        assert len(movers) == 1, "exactly one of the two redundant servers moves"
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)
