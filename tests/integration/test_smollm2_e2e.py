"""SmolLM2 end to end: three real petald daemons serve [0,10) [10,20) [20,30); `petalctl` and the OpenAI client
talk to the first one's socket, and the text equals transformers' greedy `generate` on the same model dir.

This is the path a user takes (the README's demo), so it runs the real CLI as a subprocess, not in-process. The
daemons run with all defaults (no --codec: `auto`, which is exact on these loopback links); the other tests ask for
a codec per request (`petalctl generate --codec`, the OpenAI body's `codec`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.daemons import Swarm, wait_for_route

pytestmark = pytest.mark.smollm2

MODEL = "smollm2"
NEW_TOKENS = 24
PETALCTL = [sys.executable, "-c", "from petal.ctl.cli import main; main()"]


@pytest.fixture(scope="module")
def swarm(smollm2_dir):
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(smollm2_dir.parent), "OMP_NUM_THREADS": "1"}
    try:
        serve = ("--serve", MODEL)  # all defaults: the codec is auto (none here; q8 would change the text)
        first = s.make("s0", "--new-swarm", *serve, "--blocks", "0:10").start(extra_env=env)
        boot = first.address
        with ThreadPoolExecutor(max_workers=2) as pool:  # startup is mostly loading and waiting: overlap it
            futures = [
                pool.submit(s.make(f"s{i}", "--initial-peer", boot, *serve, "--blocks", blocks).start, env)
                for i, blocks in ((1, "10:20"), (2, "20:30"))
            ]
            for f in futures:
                f.result()
        chain = wait_for_route(first, MODEL, 30)
        assert [(h["start"], h["end"]) for h in chain] == [(0, 10), (10, 20), (20, 30)]
        yield first
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy_ids(smollm2_dir, local_model):
    """transformers' greedy new token ids for prompt ids, and the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = local_model

    def greedy_ids(ids: list[int], n: int = NEW_TOKENS) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return [int(t) for t in out[0, len(ids) :]]

    return tokenizer, greedy_ids


@pytest.fixture(scope="module")
def reference(greedy_ids):
    tokenizer, ids_of = greedy_ids

    def greedy_text(ids: list[int], n: int = NEW_TOKENS) -> str:
        return tokenizer.decode(ids_of(ids, n), skip_special_tokens=True)

    return tokenizer, greedy_text


def petalctl(socket_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PETALCTL, "--socket", str(socket_path), *args], capture_output=True, text=True, timeout=300)


def test_all_defaults_generate_equals_transformers(swarm, greedy_ids):
    """What a user gets with every default (daemons, petalctl, request): transformers' greedy tokens and text."""
    tokenizer, ids_of = greedy_ids
    prompt = "The capital of France is"
    done = petalctl(swarm.socket, "--json", "generate", "-m", MODEL, prompt, "--max-new-tokens", str(NEW_TOKENS))
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.splitlines()[-1])
    want_ids = ids_of(tokenizer(prompt)["input_ids"])
    assert last["done"] and len(want_ids) == NEW_TOKENS
    assert last["tokens"] == want_ids
    assert last["text"] == tokenizer.decode(want_ids, skip_special_tokens=True)
    # by default a server's only session runs its decode steps on the event loop (--inline-steps): this path too
    assert sum(s.get("inline_steps", 0) for s in swarm.status()["serving"]) >= NEW_TOKENS // 2
    # the comparison has teeth: q8 on every hop (asked for) drifts from transformers within these tokens
    q8 = petalctl(swarm.socket, "--json", "generate", "-m", MODEL, prompt, "--max-new-tokens", str(NEW_TOKENS),
                  "--codec", "q8")  # fmt: skip
    assert q8.returncode == 0, q8.stderr
    q8_ids = json.loads(q8.stdout.splitlines()[-1])["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(q8_ids, want_ids, strict=True)) if a != b), None)
    print(f"\nq8 on the wire: first token differing from transformers: {same} of {NEW_TOKENS}")


def test_all_defaults_long_prompt_prefills_as_a_pipeline_and_equals_transformers(swarm, greedy_ids):
    """A prompt of ~300 tokens with every default: its prefill runs as position chunks (each server gets them one
    by one, so the three compute at the same time) and the greedy tokens still equal transformers'."""
    tokenizer, ids_of = greedy_ids
    prompt = " ".join(f"Fact {i}: the {i}th city on the list is larger than the one before it." for i in range(20))
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) >= 256, f"the prompt is {len(ids)} tokens: too short for 2 chunks of 128"
    before = swarm.status()["serving"][0]["inference_steps"]
    done = petalctl(swarm.socket, "--json", "generate", "-m", MODEL, prompt, "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    ran = swarm.status()["serving"][0]["inference_steps"] - before
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["tokens"] == ids_of(ids, 8)
    assert ran >= 7 + 2, f"blocks 0..10 ran {ran} steps for 7 decode steps: the prefill was not cut in chunks"


def test_petalctl_generate_equals_transformers(swarm, reference):
    tokenizer, greedy_text = reference
    prompt = "The capital of France is"
    done = petalctl(
        swarm.socket, "generate", "-m", MODEL, prompt, "--max-new-tokens", str(NEW_TOKENS), "--codec", "none"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n")
    want = greedy_text(tokenizer(prompt)["input_ids"])
    assert want.strip(), "the reference produced no text: the comparison would prove nothing"
    assert done.stdout[:-1] == want


def test_petalctl_generate_chat_equals_transformers(swarm, reference):
    tokenizer, greedy_text = reference
    prompt = "What is the capital of France?"
    done = petalctl(
        swarm.socket, "generate", "-m", MODEL, "--chat", prompt, "--max-new-tokens", str(NEW_TOKENS), "--codec", "none"
    )
    assert done.returncode == 0, done.stderr
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert done.stdout[:-1] == greedy_text(list(ids))


def test_openai_chat_streamed_equals_non_streamed(swarm, reference):
    import httpx
    import openai

    tokenizer, greedy_text = reference
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(swarm.socket)), timeout=300)
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    messages = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0, extra_body={"codec": "none"}
    )
    text = chat.choices[0].message.content
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert text == greedy_text(list(ids))
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=NEW_TOKENS, temperature=0, stream=True
        )
    ]
    assert len([p for p in pieces if p]) > 1, "the answer should arrive in several pieces"
    assert "".join(pieces) == text
    http.close()


def test_all_defaults_forward_runs_as_a_pipeline_and_equals_transformers(swarm, smollm2_dir, local_model):
    """A forward of several rows with every default runs as a pipeline of micro-batches (each server gets them one
    by one, so the three compute at the same time) and its logits equal transformers'."""
    from petal.ctl.remote_model import RemoteModelForCausalLM

    model = RemoteModelForCausalLM.from_pretrained(smollm2_dir, socket=str(swarm.socket))
    x = torch.randint(0, local_model.config.vocab_size, (6, 64), generator=torch.Generator().manual_seed(2))
    calls_before = swarm.status()["serving"][0]["training_calls"]
    with torch.no_grad():
        got = model(x).logits
        want = local_model(input_ids=x).logits
    runs = swarm.status()["serving"][0]["training_calls"] - calls_before
    assert runs >= 3, f"blocks 0..10 ran {runs} forward(s): 6 x 64 tokens should be 3 micro-batches of 128"
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    print(f"\nSmolLM2 pipelined forward 6x64: max |diff| {diff:.2e} (max |ref| {scale:.1f})")
    assert diff <= 1e-4 * max(1.0, scale)


def test_lora_forward_and_backward_equal_peft(swarm, smollm2_dir, local_model):
    """Fine-tuning on the real model: logits and LoRA gradients through the 3 daemons equal PEFT run locally."""
    from petal.ctl.remote_model import RemoteModelForCausalLM
    from tests.support.torchref import peft_key, peft_llama

    model = RemoteModelForCausalLM.from_pretrained(smollm2_dir, socket=str(swarm.socket), codec="none")
    targets = ["q_proj", "v_proj"]
    lora = model.enable_lora(rank=4, alpha=8.0, targets=targets, blocks=[0, 12, 29])
    with torch.no_grad():
        for w in lora.parameters():
            w.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))  # B = 0 (PEFT's init) would zero A's grads
    x = torch.randint(0, local_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(x, labels=x)
    out.loss.backward()

    peft = peft_llama(local_model, lora.weights(), rank=4, alpha=8.0, targets=targets)
    want = peft(input_ids=x, labels=x)
    want.loss.backward()
    scale = float(want.logits.abs().max())
    diff = float((out.logits - want.logits).abs().max())
    print(
        f"\nSmolLM2 LoRA logits: max |diff| {diff:.2e} (max |ref| {scale:.1f}); loss {out.loss.item():.5f} vs "
        f"{want.loss.item():.5f}"
    )
    assert diff <= 1e-4 * max(1.0, scale)
    params = dict(peft.named_parameters())
    worst = 0.0
    for key, w in lora.weights().items():
        ref = params[peft_key(key)].grad
        assert w.grad is not None and float(ref.abs().max()) > 0, key
        rel = float((w.grad - ref).abs().max()) / float(ref.abs().max())
        worst = max(worst, rel)
        assert rel <= 1e-3, f"{key}: relative grad error {rel:.2e}"
    print(f"SmolLM2 LoRA grads: worst max|diff|/max|ref| {worst:.2e} over {len(lora.weights())} tensors")
