"""The whole OpenAI surface through real petald daemons and the real ``openai`` client: logprobs (legacy and chat),
echo scoring, n choices, penalties, logit_bias, stop lists, include_usage, batched prompts and embeddings.

The swarm is test_generate_api's: two daemons serving a tiny random 6-block Llama with SmolLM2's tokenizer. Every
number is checked against transformers on the same weights in float32: log-probabilities to 1e-4 (absolute),
embeddings to 1e-4, greedy tokens exactly.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from tests.integration import test_generate_api as base

MODEL = base.MODEL
TOL = 1e-4
model = base.model
swarm = base.swarm
tokenizer = base.tokenizer
raw = base.raw


@pytest.fixture(scope="module")
def client(swarm):
    return base.openai_client(swarm.socket)


def log_softmax(m, ids: list[int]) -> torch.Tensor:
    """transformers' log-probabilities at every position of ``ids`` ``[len, vocab]``."""
    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), dim=-1)


def name(tok, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


def greedy_with(m, ids: list[int], n: int, presence: float = 0.0, frequency: float = 0.0, bias=None) -> list[int]:
    """Greedy decoding with OpenAI's penalties and logit_bias, computed by hand on transformers' logits."""
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = m(torch.tensor([ids + out])).logits[0, -1].float()
        for token, value in (bias or {}).items():
            logits[token] += value
        for token in set(out):
            logits[token] -= out.count(token) * frequency + presence
        token = int(logits.argmax())
        if token == 2:  # the model's end-of-sequence token
            break
        out.append(token)
    return out


def test_completion_logprobs_equal_transformers(client, model, tokenizer):
    ids = [5, 901, 77, 3000, 12, 45000]
    want = base.reference(model[1], ids, 8)
    done = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert lp.tokens == [name(tokenizer, t) for t in want]
    ref = log_softmax(model[1], ids + want)
    for i, token in enumerate(want):
        row = ref[len(ids) - 1 + i]
        assert abs(lp.token_logprobs[i] - float(row[token])) < TOL
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert abs(top[0] - float(row.max())) < TOL and len(lp.top_logprobs[i]) <= 2
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert done.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_echo_scores_the_prompt_as_harnesses_ask(client, model, tokenizer):
    prompts = ["The capital of France is Paris", "One, two, three"]
    done = client.completions.create(model=MODEL, prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert [c.index for c in done.choices] == [0, 1]
    for choice, text in zip(done.choices, prompts, strict=True):
        ids = tokenizer(text)["input_ids"]
        ref = log_softmax(model[1], ids)
        assert choice.text == text and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == [name(tokenizer, t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < TOL
            ((best, value),) = lp.top_logprobs[i].items()
            assert best == name(tokenizer, int(ref[i - 1].argmax())) and abs(value - float(ref[i - 1].max())) < TOL
    assert done.usage.completion_tokens == 0
    assert done.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    # echo with generation: the text and logprobs are the prompt's followed by the completion's
    ids = tokenizer(prompts[1])["input_ids"]
    more = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=3, echo=True, logprobs=0, temperature=0)
    want = base.reference(model[1], ids, 3)
    ref = log_softmax(model[1], ids + want)
    lp = more.choices[0].logprobs
    assert more.choices[0].text == prompts[1] + tokenizer.decode(want, skip_special_tokens=True)
    assert len(lp.tokens) == len(ids) + len(want) and lp.top_logprobs[1] == {}
    scored = [float(ref[i - 1, t]) for i, t in enumerate(ids + want) if i > 0]
    assert np.allclose(lp.token_logprobs[1:], scored, atol=TOL)
    assert lp.text_offset[len(ids)] == len(prompts[1])
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for chunk in client.completions.create(
        model=MODEL, prompt=prompts[1], max_tokens=3, echo=True, logprobs=0, temperature=0, stream=True
    ):
        text += chunk.choices[0].text
        for key, values in streamed.items():
            values += getattr(chunk.choices[0].logprobs, key) if chunk.choices[0].logprobs else []
    assert text == more.choices[0].text and streamed == {k: getattr(lp, k) for k in streamed}


def test_chat_logprobs_whole_and_streamed(client, model, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    ids = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    want = base.reference(model[1], ids, 5)
    ref = log_softmax(model[1], ids + want)
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [name(tokenizer, t) for t in want]
    for i, (c, token) in enumerate(zip(content, want, strict=True)):
        row = ref[len(ids) - 1 + i]
        assert abs(c.logprob - float(row[token])) < TOL and c.bytes == list(c.token.encode())
        assert len(c.top_logprobs) == 3 and abs(c.top_logprobs[0].logprob - float(row.max())) < TOL
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True
    ):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=TOL)
    assert all(c.top_logprobs == [] for c in streamed)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_are_seeded_and_batched_prompts_index_prompt_major(swarm, client):
    body = dict(model=MODEL, prompt=[1, 2, 3], max_tokens=8, temperature=1.0, seed=5, n=3)
    a = client.completions.create(**body)
    b = client.completions.create(**body)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3
    native = {"model": MODEL, "input_ids": [1, 2, 3], "max_new_tokens": 8, "temperature": 1.0, "stream": False}
    tokens = 0
    for i, choice in enumerate(a.choices):  # choice i samples as the native API does with seed + i
        alone = swarm.client.request("POST", "/v1/generate", {**native, "seed": 5 + i})
        assert choice.text == alone["text"]
        tokens += len(alone["tokens"])
    assert a.usage.prompt_tokens == 3 and a.usage.completion_tokens == tokens
    batch = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [7, 8]], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text and batch.choices[2].text == batch.choices[3].text
    alone = client.completions.create(model=MODEL, prompt=[7, 8], max_tokens=4, temperature=0)
    assert batch.choices[2].text == alone.choices[0].text
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(**{**body, "stream": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_penalties_and_logit_bias_change_greedy_as_openai_defines(client, model, tokenizer):
    ids = [5, 901, 77, 3000, 12, 45000]
    m = model[1]
    cases = [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5, "presence_penalty": -0.5},
        {"logit_bias": {str(base.reference(m, ids, 1)[0]): -100}},
        {"logit_bias": {"42": 100}},
    ]
    plain = base.reference(m, ids, 10)
    changed = 0
    for extra in cases:
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=0, **extra)
        bias = {int(k): float(v) for k, v in extra.get("logit_bias", {}).items()}
        want = greedy_with(m, ids, 10, extra.get("presence_penalty", 0.0), extra.get("frequency_penalty", 0.0), bias)
        assert out.choices[0].logprobs.tokens == [name(tokenizer, t) for t in want], extra
        changed += want != plain
    assert changed >= 3  # ban and force change the output for sure; the penalties on a repetitive random model


def test_stop_lists_cut_and_include_usage_sends_the_usage_chunk(client):
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stop=["\u2603never", stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="The capital of France is",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens
    assert "".join(c.text for ch in chunks for c in ch.choices) == text
    chat_chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chat_chunks[-1].choices == [] and chat_chunks[-1].usage.total_tokens > 3


def test_embeddings_equal_a_local_mean_pool(client, swarm, model, tokenizer):
    texts = ["The capital of France is Paris", "hi", "One, two, three, four"]
    with torch.no_grad():
        want = [model[1].model(torch.tensor([tokenizer(t)["input_ids"]])).last_hidden_state[0].mean(0) for t in texts]
    got = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2]
    for d, w in zip(got.data, want, strict=True):
        assert np.allclose(d.embedding, w.numpy(), atol=TOL)
    status, _, data = raw(swarm.socket, "POST", "/v1/embeddings", {"model": MODEL, "input": [5, 6, 7]})
    reply = json.loads(data)
    with torch.no_grad():
        ref = model[1].model(torch.tensor([[5, 6, 7]])).last_hidden_state[0].mean(0)
    assert status == 200 and np.allclose(reply["data"][0]["embedding"], ref.numpy(), atol=TOL)
    assert reply["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    status, _, data = raw(
        swarm.socket, "POST", "/v1/embeddings", {"model": MODEL, "input": [[5, 6, 7]], "encoding_format": "base64"}
    )
    vector = np.frombuffer(base64.b64decode(json.loads(data)["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vector, ref.numpy(), atol=TOL)


BAD = [
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "1"}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "stream": True}, "stream"),
    ("/v1/completions", {"prompt": [[1], "x", 3]}, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 65}, "prompt"),
    ("/v1/completions", {"prompt": ["x"] * 9, "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": [1, "x"]}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 8}, "dimensions"),
]


def test_bad_fields_are_400s_in_openais_error_shape(swarm, client):
    for path, fields, param in BAD:
        status, ctype, data = raw(swarm.socket, "POST", path, {"model": MODEL, **fields})
        err = json.loads(data)["error"]
        assert (status, ctype, err["type"], err["param"], err["code"]) == (
            400,
            "application/json",
            "invalid_request_error",
            param,
            "bad_request",
        ), (path, fields, err)
        assert err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", logprobs=9)
    assert e.value.param == "logprobs" and "logprobs" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_new_shapes_match_docs_api_yaml(swarm):
    import jsonschema
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())

    def check(path: str, body: dict, valid: bool = True) -> None:
        op = spec["paths"][path]["post"]
        request_schema = {
            **op["requestBody"]["content"]["application/json"]["schema"],
            "components": spec["components"],
        }
        assert jsonschema.Draft202012Validator(request_schema).is_valid(body) == valid
        status, ctype, data = raw(swarm.socket, "POST", path, body)
        response = op["responses"][str(status)]
        if "$ref" in response:
            response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        schema = {**response["content"][ctype]["schema"], "components": spec["components"]}
        if ctype == "text/event-stream":
            events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            items = [json.loads(e) for e in events[:-1]]
        else:
            items = [json.loads(data)]
        for item in items:
            jsonschema.validate(item, schema)

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    check("/v1/completions", {"model": MODEL, "prompt": ["Hi", "Yo"], "max_tokens": 2, "n": 2, "logprobs": 2})
    check("/v1/completions", {"model": MODEL, "prompt": [[1, 2], [3]], "max_tokens": 0, "echo": True, "logprobs": 1})
    check(
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": "Hi",
            "max_tokens": 3,
            "echo": True,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "presence_penalty": 1,
            "frequency_penalty": 0.5,
            "logit_bias": {"42": 5},
        },
    )
    check("/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 0}, valid=False)
    check("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 1})
    check("/v1/chat/completions", {**chat, "logprobs": True, "stream": True, "stream_options": {"include_usage": True}})
    check("/v1/embeddings", {"model": MODEL, "input": ["a", "b"]})
    check("/v1/embeddings", {"model": MODEL, "input": [[1, 2]], "encoding_format": "base64"})
    check("/v1/embeddings", {"model": MODEL, "input": ""}, valid=False)
    check("/v1/embeddings", {"model": "nope", "input": "x"})
