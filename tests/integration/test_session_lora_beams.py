"""Inference sessions that carry client-owned LoRA, and beam search with server-side cache reorder, over real daemons.

One swarm for the module (tests/support/torchref.py): three servers host blocks [0,10), [10,20), [20,30) of a tiny
random 30-block Llama; the test talks to a fourth daemon (serving nothing) over its socket, with codec "none", so
outputs equal local transformers/PEFT up to float32 rounding (ATOL on hidden states and logits) and greedy or beam
tokens are equal. The client daemon's sessions use push by default (servers pass each step on to the next hop);
the reorder test also runs without push (the daemon relays every hop).
"""

from __future__ import annotations

import pytest
import torch

from petal.ctl.client import Client, DaemonError, StreamSession
from petal.ctl.remote_model import RemoteModelForCausalLM
from tests.support.torchref import peft_llama, tiny_llama_swarm

MODEL = "tiny-llama"
ATOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def env():
    with tiny_llama_swarm("petal-lb-", MODEL) as env:
        yield env


def remote(env, **kwargs) -> RemoteModelForCausalLM:
    path, _, sock = env
    return RemoteModelForCausalLM.from_pretrained(path, sock, codec="none", **kwargs)


def ids(batch: int = 1, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_lora(env) -> tuple[RemoteModelForCausalLM, torch.nn.Module]:
    """A remote model with random nonzero LoRA on some blocks, and the same LoRA as a local PEFT model."""
    _, ref, _ = env
    model = remote(env)
    lora = model.enable_lora(rank=4, alpha=8.0, targets=TARGETS, blocks=[0, 4, 9, 10, 17, 25, 29])
    torch.manual_seed(3)
    with torch.no_grad():
        for w in lora.parameters():
            w.normal_(0, 0.3)  # large enough to change the greedy tokens
    return model, peft_llama(ref, lora.weights(), rank=4, alpha=8.0, targets=TARGETS).eval()


def test_session_with_lora_equals_peft(env):
    """Prefill then single-token steps in one session: every step's logits equal PEFT's over the whole sequence."""
    model, peft = with_lora(env)
    _, ref, _ = env
    x = ids(batch=2, length=9, seed=1)
    with torch.no_grad():
        want = peft(input_ids=x).logits
        plain = ref(input_ids=x).logits
        emb = model.parts.embed(x)
        with model.inference_session(max_length=12, batch=2) as session:
            parts = [session.step(emb[:, :5]), session.step(emb[:, 5:6]), session.step(emb[:, 6:])]
        got = model.parts.logits(torch.cat(parts, dim=1))
    assert (want - plain).abs().max() > 1e-2  # the LoRA changes the output, so the check below means something
    assert (got - want).abs().max() < ATOL


def test_greedy_generate_with_lora_equals_peft(env):
    model, peft = with_lora(env)
    x = ids(batch=2, length=4, seed=2)
    want = peft.generate(input_ids=x, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    _, ref, _ = env
    base = ref.generate(x, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not torch.equal(want, base)  # the adapter changes what is generated
    assert torch.equal(model.generate(x, 10, eos_token_id=[]), want)


EOS = [45, 102]
"""End-of-sequence ids the random model likes after these prompts: some beams finish early (checked below)."""


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_equals_transformers(env, early_stopping):
    """One session of num_beams rows, reordered on the servers each step: transformers' beam search tokens."""
    _, ref, _ = env
    model = remote(env)
    x = torch.cat([ids(length=4, seed=s) for s in range(3)])
    eos = EOS
    kw = dict(num_beams=3, do_sample=False, length_penalty=1.0, early_stopping=early_stopping)
    want = ref.generate(x, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos[0], **kw)
    got = model.generate(x, 8, eos_token_id=eos, **kw)
    assert torch.equal(got, want), (got, want)
    assert any(set(eos) & set(row[4:]) for row in got.tolist())  # some rows ended early (padded with an EOS id)


def test_beam_search_with_lora_equals_peft(env):
    model, peft = with_lora(env)
    x = ids(length=5, seed=4)
    kw = dict(num_beams=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(model.generate(x, 6, eos_token_id=[], num_beams=4), peft.generate(x, max_new_tokens=6, **kw))


@pytest.mark.parametrize("push", [True, False])
def test_step_reorder_gathers_cache_rows(env, push):
    """A step with ``reorder`` runs on the gathered rows' caches: its output equals a full forward of the gathered
    sequences (rows may repeat, as in beam search)."""
    _, ref, sock = env
    client = Client(sock)
    x = ids(batch=3, length=6, seed=5)
    nxt = ids(batch=3, length=1, seed=6)
    order = [2, 0, 0]
    with torch.no_grad():
        emb = ref.model.embed_tokens(x)
        step = ref.model.embed_tokens(nxt)
        want = ref.model(inputs_embeds=torch.cat([emb[order], step], dim=1)).last_hidden_state[:, -1:]
    model = remote(env)
    with client.session_stream(MODEL, 8, batch=3, codec="none", push=push) as session:
        session.step(emb)
        got = session.step(step, None, order)
        assert session.position == 7
        with pytest.raises(DaemonError) as bad:
            session.step(step, None, [0, 1, 3])
        assert bad.value.code == "bad_request" and "reorder" in bad.value.message
    with torch.no_grad():
        assert (model.parts.logits(got) - ref.lm_head(want)).abs().max() < ATOL  # want is after the final norm


def test_generate_endpoint_num_beams_equals_transformers(env):
    path, ref, sock = env
    x = ids(length=5, seed=7)
    want = ref.generate(x, max_new_tokens=6, num_beams=3, do_sample=False)[0, 5:].tolist()
    eos = ref.generation_config.eos_token_id
    if want and want[-1] == eos:
        want = want[:-1]
    lines = list(
        Client(sock).stream(
            "POST",
            "/v1/generate",
            {"model": str(path), "input_ids": x[0].tolist(), "max_new_tokens": 6, "num_beams": 3, "codec": "none"},
        )
    )
    assert lines[-1]["done"] and lines[-1]["tokens"] == want
    with pytest.raises(DaemonError) as bad:
        list(
            Client(sock).stream(
                "POST", "/v1/generate", {"model": str(path), "input_ids": [1, 2], "num_beams": 2, "temperature": 0.7}
            )
        )
    assert bad.value.code == "bad_request" and "num_beams" in bad.value.message


def generate_ids(sock, path, ids: list[int], **options) -> dict:
    body = {"model": str(path), "input_ids": ids, "max_new_tokens": 24, "codec": "none", **options}
    *_, done = Client(sock).stream("POST", "/v1/generate", body)
    return done


def test_speculative_generation_gives_the_greedy_tokens_in_fewer_steps(env):
    """Prompt-lookup drafts checked in one step each: the tokens of plain greedy decoding (and of transformers),
    fewer swarm round trips than tokens, and rejected guesses rolled back (else later tokens would differ)."""
    path, ref, sock = env
    eos = ref.generation_config.eos_token_id
    rejected = 0
    for seed in range(3):
        x = ids(length=6, seed=10 + seed)
        prompt = torch.cat([x, x], dim=1)[0].tolist()  # a repeated prompt: lookup has something to find
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
        if eos in want:
            want = want[: want.index(eos)]
        plain = generate_ids(sock, path, prompt)
        fast = generate_ids(sock, path, prompt, speculative=4)
        assert plain["tokens"] == want and fast["tokens"] == want
        stats = fast["speculative"]
        print(f"seed {seed}: {len(want)} tokens in {stats['steps']} steps, {stats}")
        assert stats["accepted"] > 0 and stats["steps"] < len(want) + 1
        rejected += stats["drafted"] - stats["accepted"]
    assert rejected > 0  # some guesses were thrown away, so the rollback path ran (and the tokens stayed right)


def test_python_client_prompt_lookup_equals_greedy(env, monkeypatch):
    """`generate(prompt_lookup_num_tokens=K)` over a socket session (rejected guesses dropped with a step's
    ``position``) gives transformers' greedy tokens in fewer steps."""
    _, ref, _ = env
    model = remote(env)
    steps: list[int | None] = []  # each step's rollback position
    real_step = StreamSession.step

    def counting_step(self, hidden, mask=None, reorder=None, position=None):
        steps.append(position)
        return real_step(self, hidden, mask, reorder, position)

    monkeypatch.setattr(StreamSession, "step", counting_step)
    for seed in range(3):  # the prompts of the test above, where some guesses are rejected
        x = ids(length=6, seed=10 + seed)
        prompt = torch.cat([x, x], dim=1)
        want = ref.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(model.generate(prompt, 24, eos_token_id=[], prompt_lookup_num_tokens=4), want)
    assert len(steps) < 3 * 24 and any(p is not None for p in steps), steps  # guesses kept, and some rolled back
    with pytest.raises(ValueError, match="greedy"):
        model.generate(torch.cat([x, x]), 4, prompt_lookup_num_tokens=4)
