"""Spot checks: the pure comparison and verdicts, then sessions and forward calls over in-process servers where one
server lies (``ServeSettings.test_lie``): the caller gets the honest output, the liar is banned, counted and reported.
Real daemons: tests/integration/test_trust.py."""

from __future__ import annotations

import asyncio

import pytest
import torch

from petal.daemon.routing.calls import forward
from petal.daemon.routing.session import InferenceSession
from petal.daemon.routing.spotcheck import (
    Agreement,
    SpotChecker,
    compare,
    judge,
    read_reports,
    tolerance_for,
    verify_swarm,
)
from petal.daemon.routing.swarm import group_servers
from petal.daemon.serving.settings import ServeSettings
from petal.protocol.records import ServerRecord
from tests.support.swarms import MODEL, embed

LIAR = ServeSettings(test_lie=0.5)


def hidden(seed: int, shape=(2, 5, 64)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the comparison (pure) ---------------------------------------------------------------------------------------


def test_compare_tolerates_rounding_not_noise():
    x = hidden(0)
    same = compare(x, x.clone())
    assert same == Agreement(0.0, 1.0)
    rounded = compare(x, x.to(torch.bfloat16).float())
    assert 0 < rounded.rel_l2 < 1e-2 and rounded.topk > 0.9
    noisy = compare(x, x + 0.5 * torch.randn_like(x))
    assert 0.3 < noisy.rel_l2 < 0.7
    tol = tolerance_for("none", ["float32"])
    assert same.within(tol) and not noisy.within(tol)
    assert rounded.within(tolerance_for("none", ["bfloat16", "float32"]))
    assert compare(x, x[:, :4]).rel_l2 == float("inf")  # another shape: total disagreement
    assert compare(x, torch.full_like(x, float("nan"))).within(tol) is False
    assert compare(x, x.roll(7, dims=-1)).topk < 0.5  # the largest dimensions moved elsewhere: top-k catches it


def test_tolerance_grows_with_lossy_dtypes_quantization_and_codecs():
    exact = tolerance_for("none", ["float32"])
    assert exact.rel_l2 < tolerance_for("q8", ["float32"]).rel_l2
    assert exact.rel_l2 < tolerance_for("none", ["float32", "bfloat16"]).rel_l2
    assert tolerance_for("none", ["float32"], ["int8"]).rel_l2 > tolerance_for("none", ["float32"], ["none"]).rel_l2
    assert exact.topk > tolerance_for("q8", ["bfloat16"], ["int8"]).topk
    assert tolerance_for("q8", ["bfloat16"], ["int8"]).rel_l2 < 0.5  # a liar's noise stays well outside


def test_judge_takes_the_local_reference_or_the_majority():
    x = hidden(1)
    bad = x + 0.5 * torch.randn_like(x)
    tol = tolerance_for("none", ["float32"])
    v = judge({"a": x.clone(), "b": x.clone(), "liar": bad}, tol)
    assert {p: v[p].verdict for p in v} == {"a": "pass", "b": "pass", "liar": "fail"}
    assert v["liar"].agreement is not None and v["liar"].agreement.rel_l2 > 0.3
    v = judge({"a": x, "liar": bad}, tol)  # two that disagree and nobody to tell: both suspect
    assert {v["a"].verdict, v["liar"].verdict} == {"disputed"}
    v = judge({"a": x, "liar": bad}, tol, local=x)  # this daemon's own blocks decide
    assert (v["a"].verdict, v["liar"].verdict, v["liar"].reference) == ("pass", "fail", "local")
    assert judge({"a": x}, tol)["a"].verdict == "unchecked"
    assert judge({"a": x, "b": x.clone()}, tol)["b"].verdict == "pass"


def test_servers_without_the_views_fingerprint_never_join_a_chain():
    def value(fp: str | None) -> dict:
        return ServerRecord((), 0, 4, "online", 1.0, 64, "float32", 1, fingerprint=fp).to_value()

    grouped = group_servers([("ok", value("FP")), ("other", value("OTHER")), ("unnamed", value(None))], "FP")
    assert set(grouped) == {"ok"}
    assert set(group_servers([("ok", value("FP")), ("unnamed", value(None))])) == {"ok", "unnamed"}


def test_rate_is_a_fraction():
    with pytest.raises(ValueError, match="fraction"):
        SpotChecker(router=None, rate=1.5)  # type: ignore[arg-type]


# --- in-process servers, one of them lying ------------------------------------------------------------------------


async def greedy(swarm, model, prompt, n) -> list[int]:
    out = []
    async with InferenceSession(swarm.router, MODEL, max_length=prompt.shape[1] + n, codec="none") as s:
        with torch.no_grad():
            h = await s.step(embed(model, prompt))
            for i in range(n):
                nxt = model.lm_head(model.model.norm(h[:, -1])).argmax(-1)
                out.append(int(nxt))
                if i + 1 < n:
                    h = await s.step(embed(model, nxt[:, None]))
    return out


async def test_session_with_a_liar_gives_the_honest_output_and_bans_it(swarm, model):
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    await swarm.add(0, 3)
    honest = [await swarm.add(3, 6), await swarm.add(3, 6)]
    liar = await swarm.add(3, 6, settings=LIAR)
    spot = swarm.router.spot
    spot.rate = 1.0
    await swarm.router.inference_chain(MODEL)  # probes every server once (again only after router.period)
    swarm.router.latency.update({honest[0]: 1.0, honest[1]: 1.0, liar: 0.0})
    assert (await swarm.router.inference_chain(MODEL))[-1].peer_id == liar  # the chain takes the liar first
    assert await greedy(swarm, model, prompt, 8) == want
    assert swarm.router.is_banned(liar) and spot.caught[liar] == 1
    swarm.router.bans.succeeded(liar)  # unbanned: now the liar is found as a reference of the honest hop
    swarm.router.latency[liar] = 2.0
    assert await greedy(swarm, model, prompt, 8) == want
    assert swarm.router.is_banned(liar) and not any(swarm.router.is_banned(p) for p in honest)
    assert spot.caught == {liar: 2} and spot.mismatches == 2 and spot.checks > 8
    for _ in range(5):  # let the report's publication (a background task) run
        await asyncio.sleep(0)
    reports = await read_reports(swarm.client_dht, MODEL, [liar, *honest])
    assert list(reports) == [liar]  # signed by the client, once however often it caught the liar
    [seen] = reports[liar]
    assert seen.signer == swarm.client_id.peer_id and seen.report.rel_l2 > 0.1 and seen.report.how == "spot"


async def test_forward_with_a_liar_is_checked_and_run_again(swarm, model):
    await swarm.add(0, 6, settings=LIAR)
    await swarm.add(0, 6)
    await swarm.add(0, 6)
    swarm.router.spot.rate = 1.0
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model.model(ids).last_hidden_state  # includes the final norm: compare before it
        x = embed(model, ids)
        for _ in range(4):
            got = await forward(swarm.router, MODEL, x, codec="none")
            torch.testing.assert_close(model.model.norm(got), want, atol=1e-4, rtol=0)
    assert len(swarm.router.spot.caught) == 1


async def test_verify_flags_exactly_the_liar(swarm, model):
    await swarm.add(0, 2)
    await swarm.add(0, 2)
    a = await swarm.add(2, 6)
    b = await swarm.add(2, 6)
    liar = await swarm.add(2, 6, settings=LIAR)
    view = await swarm.router.view(MODEL)
    out = await verify_swarm(swarm.router.spot, view, report=True)
    verdicts = {s["peer_id"]: s["verdict"] for s in out["servers"]}
    assert verdicts[liar] == "fail" and verdicts[a] == verdicts[b] == "pass"
    assert list(verdicts.values()).count("pass") == 4 and out["local_reference"] is False
    row = next(s for s in out["servers"] if s["peer_id"] == liar)
    assert row["rel_l2"] > 0.1 and row["segments"] == [{**row["segments"][0], "start": 2, "end": 6}]
    assert list(await read_reports(swarm.client_dht, MODEL, verdicts)) == [liar]
