"""Issue #16 findings 7, 8 and 14 at the routing layer: a model's shape comes from the local copy, or from records that
agree with the servers' block records, never from one record; what the router keeps stays bounded; and a request no
server can take is refused before it is sent, as the caller's error, while an unreadable reply is the server's."""

from __future__ import annotations

import time
from typing import cast

import pytest
import torch

from petal.daemon.dht.interface import SwarmDHT
from petal.daemon.net.transport import PeerAddr, Transport
from petal.daemon.routing.bans import BanList
from petal.daemon.routing.faults import is_server_fault
from petal.daemon.routing.remote import RemoteSpan, check_request_size
from petal.daemon.routing.router import MAX_PEERS, MAX_VIEWS, Router
from petal.daemon.routing.swarm import MAX_UNCONFIRMED_BLOCKS, ModelShape, SwarmView
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY, Entry, ModelRecord, ServerRecord, block_key
from petal.protocol.tensors import encode_tensor

FP = "FP"
N = 4


def entry(peer: str, value: dict) -> Entry:
    now = time.time()
    return Entry(peer_id=peer, public_key=b"", value=value, issued_at=now, expires_at=now + 60)


class CountingDHT:
    """Entries by key; counts every read, as a DHT lookup each costs a network walk."""

    def __init__(self, entries: dict[str, list[Entry]]) -> None:
        self.entries = entries
        self.reads: list[str] = []

    async def get(self, key: str) -> list[Entry]:
        self.reads.append(key)
        return self.entries.get(key, [])

    @property
    def dht(self) -> SwarmDHT:
        return cast(SwarmDHT, self)


def honest(model: str = "m", servers: int = 1) -> dict[str, list[Entry]]:
    """``servers`` servers of the whole model, each announcing it under MODELS_KEY and every block key."""
    out: dict[str, list[Entry]] = {MODELS_KEY: []}
    for k in range(servers):
        peer = f"server{k}"
        out[MODELS_KEY].append(entry(peer, ModelRecord(model, FP, N, "llama").to_value()))
        value = ServerRecord((), 0, N, "online", 5.0, 64, "float32", 1, fingerprint=FP).to_value()
        for b in range(N):
            out.setdefault(block_key(model, b), []).append(entry(peer, value))
    return out


def forge(entries: dict[str, list[Entry]], blocks: int, fp: str = FP, peer: str = "evil") -> None:
    entries[MODELS_KEY].append(entry(peer, ModelRecord("m", fp, blocks, "llama").to_value()))


@pytest.mark.parametrize("blocks", [N + 1, 31, 30_000])
@pytest.mark.parametrize("local", [None, ModelShape(FP, N)])
async def test_one_forged_block_count_changes_nothing_and_reads_few_keys(blocks, local):
    entries = honest()
    forge(entries, blocks)
    dht = CountingDHT(entries)
    view = SwarmView(dht.dht, "m", local=local)
    await view.refresh()
    assert (view.fingerprint, view.num_blocks) == (FP, N)
    assert set(view.servers) == {"server0"} and view.servers["server0"].end == N
    assert len(dht.reads) <= N + 3, dht.reads  # MODELS_KEY, the claims' last blocks, the model's blocks


async def test_the_forger_with_more_identities_is_still_checked_against_block_records():
    entries = honest()
    for k in range(5):
        forge(entries, 30_000, peer=f"evil{k}")
    dht = CountingDHT(entries)
    view = SwarmView(dht.dht, "m")
    await view.refresh()
    assert view.num_blocks == N and set(view.servers) == {"server0"}
    assert len(dht.reads) <= N + 3, dht.reads


async def test_an_unconfirmed_claim_reads_a_bounded_number_of_keys():
    """No server confirms any claim (the model's last server is gone): a refresh still reads at most a bound."""
    entries = {MODELS_KEY: [entry("evil", ModelRecord("m", FP, 30_000, "llama").to_value())]}
    dht = CountingDHT(entries)
    view = SwarmView(dht.dht, "m")
    await view.refresh()
    assert view.servers == {}
    assert len(dht.reads) <= MAX_UNCONFIRMED_BLOCKS + 2


async def test_the_local_copy_decides_and_server_records_past_its_last_block_are_dropped():
    entries = honest()
    forge(entries, 31)
    forge(entries, 31, peer="evil2")  # more signers than the honest server
    bad = ServerRecord((), 3, 31, "online", 5.0, 64, "float32", 1, fingerprint=FP).to_value()
    for b in (3, 30):
        entries.setdefault(block_key("m", b), []).append(entry("evil", bad))
    view = SwarmView(CountingDHT(entries).dht, "m", local=ModelShape(FP, N))
    await view.refresh()
    assert view.num_blocks == N and set(view.servers) == {"server0"}


async def test_a_local_copy_of_another_version_still_sees_the_swarms_version():
    """The frontend then reports the conflict (pull the version the servers run), as before."""
    view = SwarmView(CountingDHT(honest()).dht, "m", local=ModelShape("OTHER", N))
    await view.refresh()
    assert (view.fingerprint, view.num_blocks) == (FP, N)


async def test_router_keeps_no_view_of_unknown_names_and_a_bounded_number_of_views():
    entries: dict[str, list[Entry]] = {MODELS_KEY: []}
    for i in range(MAX_VIEWS + 5):
        for key, values in honest(f"m{i}").items():
            entries.setdefault(key, []).extend(values)
    router = Router(transport=cast(Transport, None), dht=CountingDHT(entries).dht)
    try:
        for i in range(30):
            with pytest.raises(PetalError) as e:
                await router.view(f"junk-{i}-" + "x" * 1000)
            assert e.value.code == "not_found"
        assert router.views == 0
        for i in range(MAX_VIEWS + 5):
            assert (await router.view(f"m{i}")).num_blocks == N
        assert router.views == MAX_VIEWS
    finally:
        await router.close()


# --- finding 7: a request no server can take is refused before it is sent, as the caller's error ---------------------


def test_requests_over_the_frame_or_tensor_limits_are_the_callers_error():
    check_request_size({"model": "m", "hidden": encode_tensor(torch.zeros(1, 8, 64), "none")}, "forward")
    too_big = [
        {"hidden": encode_tensor(torch.zeros(1, 300_000, 64), "none")},  # over the 64 MiB frame
        {"hidden": encode_tensor(torch.zeros(1, 300_000, 64), "q8")},  # a small frame, but 77 MB once decoded
        {
            "hidden": encode_tensor(torch.zeros(1, 150_000, 64), "q8"),
            "grad": encode_tensor(torch.zeros(1, 150_000, 64), "q8"),
            "prompts": encode_tensor(torch.zeros(1, 1, 100_000, 64), "q8"),
        },  # each under, together over
    ]
    for request in too_big:
        with pytest.raises(PetalError) as e:
            check_request_size(request, "forward")
        assert e.value.code == "too_large" and "split" in e.value.message
        assert not is_server_fault(e.value)


class _Replies:
    """A transport whose every call answers ``raw``."""

    def __init__(self, raw: object) -> None:
        self.raw = raw

    async def call(self, peer: object, protocol_id: str, request: object, timeout: float = 30.0) -> object:
        return self.raw


async def test_an_unreadable_reply_is_the_servers_fault_and_an_error_frame_stays_what_it_says():
    bad_tensor = {"codec": "none", "dtype": "float32", "shape": [1, 2, 64], "data": b"x"}
    cases = [
        ({"hidden": bad_tensor}, "bad_reply", True),
        ({"hidden": "nope"}, "bad_reply", True),
        ({"error": {"code": "nonsense"}}, "bad_reply", True),
        ({"error": {"code": "too_large", "message": "split the batch"}}, "too_large", False),
        ({"error": {"code": "bad_tensor", "message": "NaN"}}, "bad_tensor", False),
    ]
    for raw, code, servers in cases:
        span = RemoteSpan(cast(Transport, _Replies(raw)), PeerAddr("peer", ()), "m", FP, 0, N, "none")
        with pytest.raises(PetalError) as e:
            await span.forward(torch.zeros(1, 2, 64))
        assert (e.value.code, is_server_fault(e.value)) == (code, servers), raw


def test_bans_and_latencies_of_many_identities_stay_bounded():
    now = [0.0]
    bans = BanList(clock=lambda: now[0], max_peers=100)
    for i in range(1000):
        bans.ban(f"fake{i}")
        now[0] += 10.0  # each ban (2 s) has run out before the next identity shows up
    assert len(bans._strikes) <= 100 and len(bans._until) <= 100
    router = Router(transport=cast(Transport, None), dht=CountingDHT({}).dht)
    for i in range(3 * MAX_PEERS):
        router.record_latency(f"fake{i}", 0.01)
    assert len(router.latency) <= MAX_PEERS
