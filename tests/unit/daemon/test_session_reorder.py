"""Client sessions with cache reorder (beam search) and with client-owned LoRA, over an in-memory swarm of real
BlockServers: equal to transformers / PEFT, also when a server dies mid-generation and its history is replayed
elsewhere (the replayed history must be in the reordered row order, and the replacement must get the LoRA too).
"""

from __future__ import annotations

import re

import pytest
import torch

from petal.daemon.routing.session import InferenceSession
from petal.kernels.beams import BeamSearch
from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora
from tests.support.swarms import MODEL, LocalSwarm, N, embed, logits
from tests.support.tinymodels import tiny_llama
from tests.support.torchref import peft_llama

_PEFT_KEY = re.compile(r".*\.layers\.(\d+)\.(.+)\.lora_(A|B)\.default\.weight$")


@pytest.fixture
async def swarm(model):
    s = LocalSwarm(model)
    await s.start()
    for a, b in [(0, 2), (2, 4), (2, 4), (4, 6)]:
        await s.add(a, b)
    yield s
    await s.close()


async def kill_middle(swarm: LocalSwarm, session: InferenceSession) -> None:
    await swarm.kill(next(h.peer_id for h in session.chain if h.start <= 2 < h.end))


async def beam_search(swarm, model, prompt, num_beams, max_new, eos, kill_at=None, push=True):
    search = BeamSearch(num_beams, max_new, eos)
    async with InferenceSession(
        swarm.router, MODEL, prompt.shape[1] + max_new, num_beams, codec="none", push=push
    ) as s:
        x, reorder = embed(model, prompt.expand(num_beams, -1)), None
        with torch.no_grad():
            while True:
                if search.steps == kill_at:
                    await kill_middle(swarm, s)
                h = await s.step(x, None, reorder)
                reorder, tokens = search.step(logits(model, h[:, -1]))
                if search.done:
                    break
                x = embed(model, torch.tensor(tokens)[:, None])
        return prompt[0].tolist() + search.best, s.failovers


@pytest.mark.parametrize("push", [True, False])
async def test_beam_search_with_reorder_equals_transformers_also_across_a_failover(swarm, model, push):
    prompt = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    config = model.generation_config
    config.eos_token_id = None
    want = model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False, generation_config=config)
    got, failovers = await beam_search(swarm, model, prompt, 3, 10, [], push=push)
    assert got == want[0].tolist() and failovers == 0
    got, failovers = await beam_search(swarm, model, prompt, 3, 10, [], kill_at=6, push=push)
    assert failovers == 1 and got == want[0].tolist()


async def test_bad_reorder_is_the_callers_error_and_the_session_goes_on(swarm, model):
    x = embed(model, torch.randint(0, 128, (2, 3)))
    async with InferenceSession(swarm.router, MODEL, 8, 2, codec="none") as s:
        await s.step(x)
        for bad in ([0], [0, 2], [0, -1], "01"):
            with pytest.raises(PetalError) as e:
                await s.step(x[:, :1], None, bad)
            assert e.value.code == "bad_request" and "reorder" in e.value.message
        assert s.position == 3 and (await s.step(x[:, :1], None, [1, 1])).shape == (2, 1, x.shape[2])


def random_lora(model) -> tuple[Lora, torch.nn.Module]:
    import peft

    torch.manual_seed(5)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(tiny_llama(num_hidden_layers=N), config)
    weights = {}
    for name, p in pm.named_parameters():
        m = _PEFT_KEY.fullmatch(name)
        if m:
            weights[f"{m.group(1)}.{m.group(2)}.lora_{m.group(3)}"] = p.detach().clone() * 3
    ref = peft_llama(model, weights, rank=2, alpha=4.0, targets=["q_proj", "o_proj"]).eval()
    return Lora(4 / 2, weights), ref


async def test_lora_session_equals_peft_also_across_a_failover(swarm, model):
    lora, ref = random_lora(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert (want - model(ids).logits).abs().max() > 1e-2  # the LoRA matters
    async with InferenceSession(swarm.router, MODEL, 12, 2, codec="none", lora=lora) as s:
        with torch.no_grad():
            got = [await s.step(embed(model, ids[:, :5]))]
            for i in range(5, 9):
                if i == 7:
                    await kill_middle(swarm, s)
                got.append(await s.step(embed(model, ids[:, i : i + 1])))
            got = logits(model, torch.cat(got, dim=1))
        assert s.failovers == 1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


async def test_lora_outside_the_session_or_not_fitting_the_blocks_is_refused(swarm, model):
    lora, _ = random_lora(model)
    with pytest.raises(PetalError) as e:
        async with InferenceSession(swarm.router, MODEL, 8, start=2, end=4, lora=lora):
            pass
    assert e.value.code == "bad_request" and "outside the session" in e.value.message
    wrong = Lora(1.0, {"1.self_attn.nope.lora_A": torch.ones(2, 32), "1.self_attn.nope.lora_B": torch.ones(32, 2)})
    with pytest.raises(PetalError) as e:
        async with InferenceSession(swarm.router, MODEL, 8, lora=wrong):
            pass
    assert e.value.code == "bad_request" and "nope" in e.value.message
