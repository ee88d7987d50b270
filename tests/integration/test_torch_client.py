"""The torch client over real petald daemons: logits, gradients, sessions and generation equal transformers/PEFT.

One swarm for the module: three servers host blocks [0,10), [10,20), [20,30) of a tiny random 30-block Llama; the
test talks to a fourth daemon (serving nothing) over its socket, with codec "none" so results are exact up to
float32 rounding. Tolerances: logits/hidden 1e-4 absolute, gradients 1e-4 relative to their largest entry.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from petal.ctl.classify import RemoteModelForSequenceClassification
from petal.ctl.remote_model import RemoteModelForCausalLM, causal_lm_loss
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama
from tests.support.torchref import deep_prompts, peft_key, peft_llama, start_swarm

MODEL = "tiny-llama"
ATOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, rel: float = ATOL) -> bool:
    """Equal within `rel` of the larger magnitude (gradients of a 30-block model vary by orders of magnitude)."""
    scale = max(float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) <= rel * scale


@pytest.fixture(scope="module")
def env():
    root = Path(tempfile.mkdtemp(prefix="petal-tc-", dir="/tmp"))  # short: AF_UNIX paths are limited
    ref = tiny_llama(num_hidden_layers=30, hidden_size=32, intermediate_size=64)
    ref.save_pretrained(root / MODEL, safe_serialization=True)
    swarm = Swarm(root)
    try:
        client = start_swarm(swarm, root / MODEL)
        yield root / MODEL, ref, client.socket
    finally:
        swarm.close()
        shutil.rmtree(root, ignore_errors=True)


def remote(env, **kwargs) -> RemoteModelForCausalLM:
    path, _, sock = env
    return RemoteModelForCausalLM.from_pretrained(path, sock, codec="none", **kwargs)


def ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_loss_and_input_grads_match_transformers(env):
    _, ref, _ = env
    model = remote(env)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding in the first row
    labels = x.clone()
    labels[0, :3] = -100  # no loss from padded positions' logits (their values are arbitrary on both sides)
    out = model(x, attention_mask=mask, labels=labels, output_hidden_states=True)
    want = ref(x, attention_mask=mask, labels=labels)
    assert (out.logits - want.logits)[mask.bool()].abs().max() < ATOL
    assert abs(out.loss.item() - want.loss.item()) < ATOL
    assert out.hidden_states is not None and out.hidden_states[0].shape == (2, 7, 32)

    emb = model.parts.embed(x).detach().requires_grad_(True)
    hidden = model.run_blocks(emb, None, 0, 30)
    causal_lm_loss(model.parts.logits(hidden), x).backward()
    emb_ref = ref.model.embed_tokens(x).detach().requires_grad_(True)
    causal_lm_loss(ref(inputs_embeds=emb_ref).logits, x).backward()
    assert float(emb_ref.grad.abs().max()) > 0
    assert close(emb.grad, emb_ref.grad)


@pytest.mark.parametrize("deep", [False, True])
def test_prompt_grads_match_transformers(env, deep):
    _, ref, _ = env
    model = remote(env, tuning_mode="deep_ptune" if deep else "ptune", pre_seq_len=3)
    if deep:
        with torch.no_grad():
            model.prompts.deep_prompts.normal_(0, 0.1)  # non-zero, so a wrong block offset shows
    x = ids()
    out = model(x, labels=x)
    out.loss.backward()

    prompts = model.prompts.input_prompts.detach().clone().requires_grad_(True)
    deep_ref = torch.zeros(30, 3, 32) if not deep else model.prompts.deep_prompts.detach().clone()
    deep_ref.requires_grad_(deep)
    emb = torch.cat([prompts[None].expand(2, -1, -1), ref.model.embed_tokens(x)], dim=1)
    with deep_prompts(ref, deep_ref):
        logits = ref(inputs_embeds=emb).logits[:, 3:]
    loss = causal_lm_loss(logits, x)
    loss.backward()
    assert (out.logits - logits).abs().max() < ATOL
    assert close(model.prompts.input_prompts.grad, prompts.grad)
    if deep:
        assert float(deep_ref.grad[29].abs().max()) > 0  # the last block's prompts get gradients too
        assert close(model.prompts.deep_prompts.grad, deep_ref.grad)


def test_lora_grads_match_peft(env):
    _, ref, _ = env
    model = remote(env)
    lora = model.enable_lora(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"], blocks=[0, 9, 10, 25, 29])
    with torch.no_grad():
        for w in lora.parameters():
            w.normal_(0, 0.1)  # B = 0 at init would hide the A gradients
    x = ids(seed=1)
    out = model(x, labels=x)
    out.loss.backward()

    peft = peft_llama(ref, lora.weights(), rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    want = peft(input_ids=x, labels=x)
    want.loss.backward()
    assert (out.logits - want.logits).abs().max() < ATOL
    params = dict(peft.named_parameters())
    for key, w in lora.weights().items():
        assert w.grad is not None and float(w.grad.abs().max()) > 0, key
        assert close(w.grad, params[peft_key(key)].grad), key


def test_custom_path_equals_local_layers_and_is_differentiable(env):
    """Remote [3, 17) -> a local module -> remote [17, 23), against the same path run with transformers' layers."""
    from petal.kernels.families.base import causal_mask

    _, ref, _ = env
    model = remote(env)
    x = ids(batch=1)
    h = ref.model.embed_tokens(x).detach()
    positions = torch.arange(x.shape[1])[None]
    kwargs = dict(
        attention_mask=causal_mask(torch.ones_like(x), x.shape[1], h.dtype),
        position_ids=positions,
        position_embeddings=ref.model.rotary_emb(h, positions),
    )
    local = torch.nn.Linear(32, 32)
    with torch.no_grad():
        want = h
        for i in range(3, 17):
            want = ref.model.layers[i](want, **kwargs)
        assert (model.blocks(3, 17)(h) - want).abs().max() < ATOL
        want = local(want)
        for i in range(17, 23):
            want = ref.model.layers[i](want, **kwargs)

    inp = h.clone().requires_grad_(True)
    got = model.blocks(17, 23)(local(model.blocks(3, 17)(inp)))
    assert (got - want).abs().max() < ATOL
    got.pow(2).sum().backward()
    assert inp.grad is not None and float(inp.grad.abs().max()) > 0
    assert local.weight.grad is not None and float(local.weight.grad.abs().max()) > 0


def test_session_steps_equal_full_forward(env):
    model = remote(env)
    x = ids(batch=2, length=9)
    emb = model.parts.embed(x).detach()
    with torch.no_grad():
        full = model.run_blocks(emb, None, 0, 30)
        with model.inference_session(max_length=12, batch=2) as session:
            parts = [session.step(emb[:, :5]), session.step(emb[:, 5:6]), session.step(emb[:, 6:])]
            assert session.position == 9
    assert (torch.cat(parts, dim=1) - full).abs().max() < ATOL


def test_greedy_and_beam_generate_equal_transformers(env):
    _, ref, _ = env
    model = remote(env)
    x = ids(batch=1, length=4, seed=3)
    want = ref.generate(x, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(x, 10), want)

    config = copy_config(ref, eos_token_id=None)
    want = ref.generate(x, generation_config=config)
    assert torch.equal(model.generate(x, 6, num_beams=3, eos_token_id=[]), want)


def copy_config(ref, **changes):
    import copy

    config = copy.deepcopy(ref.generation_config)
    config.update(max_new_tokens=6, do_sample=False, num_beams=3, **changes)
    return config


def test_deep_prompts_apply_in_generation(env):
    """A session with deep prompts generates what full forwards with the same prompts predict."""
    model = remote(env, tuning_mode="deep_ptune", pre_seq_len=2)
    with torch.no_grad():
        model.prompts.deep_prompts.normal_(0, 0.5)
    x = ids(batch=1, length=4, seed=4)
    got = model.generate(x, 5)
    tokens = x
    with torch.no_grad():
        for _ in range(5):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, tokens)


def test_sequence_classifier_trains_head_and_prompts(env):
    path, _, sock = env
    clf = RemoteModelForSequenceClassification.from_pretrained(
        path, sock, num_labels=3, codec="none", tuning_mode="ptune", pre_seq_len=2
    )
    x = ids(batch=2, length=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = clf(x, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    assert float(clf.score.weight.grad.abs().max()) > 0
    assert float(clf.body.prompts.input_prompts.grad.abs().max()) > 0
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight", "body.prompts.input_prompts"}
