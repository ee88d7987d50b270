"""Text generation through real petald daemons: the control socket's native and OpenAI endpoints, and petalctl.

Two daemons serve a tiny random 6-block Llama ([0, 3) and [3, 6)) that carries SmolLM2's tokenizer and chat
template, so text, chat and stop sequences are exercised for real; the first daemon is also the client's local
daemon (its models dir holds the model, so it runs the embeddings and head).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from petal.ctl.cli import cli
from petal.ctl.client import DaemonError
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-chat"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def model(smollm2_dir):
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    m = tiny_llama(num_hidden_layers=6, hidden_size=32, intermediate_size=64, vocab_size=49152)
    m.generation_config.eos_token_id = 2
    m.save_pretrained(root / MODEL, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, root / MODEL / name)
    yield root, m
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def swarm(model):
    models_root, _ = model
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(models_root)}
    try:
        first = s.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:3").start(extra_env=env)
        s.make("s1", "--initial-peer", first.address, "--serve", MODEL, "--blocks", "3:6").start(extra_env=env)
        yield first
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tokenizer(model):
    return AutoTokenizer.from_pretrained(model[0] / MODEL)


def reference(m, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate on the same weights, without the end-of-sequence token."""
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    new = out[0, len(ids) :].tolist()
    return new[: new.index(2)] if 2 in new else new


def test_greedy_over_swarm_equals_transformers_generate(swarm, model):
    ids = [5, 901, 77, 3000, 12, 45000]
    lines = list(swarm.client.generate(MODEL, input_ids=ids, max_new_tokens=20))
    assert lines[-1]["done"] is True
    assert lines[-1]["tokens"] == reference(model[1], ids, 20)
    assert [line["token"] for line in lines[:-1] if line["token"] is not None] == lines[-1]["tokens"]


def test_text_prompt_streams_text_pieces_that_add_up(swarm, model, tokenizer):
    lines = list(swarm.client.generate(MODEL, "The capital of France is", max_new_tokens=12))
    final = lines[-1]
    assert "".join(line["text"] for line in lines[:-1]) == final["text"]
    ids = tokenizer("The capital of France is")["input_ids"]
    assert final["prompt_tokens"] == len(ids)
    assert final["tokens"] == reference(model[1], ids, 12)
    assert final["text"] == tokenizer.decode(final["tokens"], skip_special_tokens=True)


def test_chat_uses_the_chat_template(swarm, model, tokenizer):
    out = swarm.client.request(
        "POST", "/v1/generate", {"model": MODEL, "prompt": "hi", "chat": True, "max_new_tokens": 4, "stream": False}
    )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert out["prompt_tokens"] == len(ids)
    assert out["tokens"] == reference(model[1], list(ids), 4)


def test_sampling_is_seeded_and_stop_sequences_cut(swarm):
    body = {
        "model": MODEL,
        "input_ids": [1, 2, 3],
        "max_new_tokens": 8,
        "temperature": 1.5,
        "top_k": 50,
        "top_p": 0.9,
        "repetition_penalty": 1.2,
        "seed": 11,
        "stream": False,
    }
    a = swarm.client.request("POST", "/v1/generate", body)
    b = swarm.client.request("POST", "/v1/generate", body)
    c = swarm.client.request("POST", "/v1/generate", {**body, "seed": 12})
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 8
    assert a["tokens"] != c["tokens"]
    greedy = swarm.client.request(
        "POST", "/v1/generate", {"model": MODEL, "input_ids": [1, 2, 3], "max_new_tokens": 10, "stream": False}
    )
    text = greedy["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    cut = swarm.client.request(
        "POST",
        "/v1/generate",
        {"model": MODEL, "input_ids": [1, 2, 3], "max_new_tokens": 10, "stop": [stop], "stream": False},
    )
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]


def test_models_swarm_and_route(swarm):
    models = swarm.client.get("/v1/models")
    assert models["object"] == "list"
    [m] = [m for m in models["data"] if m["id"] == MODEL]
    assert (m["object"], m["num_blocks"], m["family"], m["servers"]) == ("model", 6, "llama", 2)
    view = swarm.client.get(f"/v1/swarm?model={MODEL}")["models"][0]
    assert sorted((s["start"], s["end"], s["state"]) for s in view["servers"]) == [(0, 3, "online"), (3, 6, "online")]
    assert view["uncovered"] == []
    route = swarm.client.get(f"/v1/route?model={MODEL}")["chain"]
    assert [(h["start"], h["end"]) for h in route] == [(0, 3), (3, 6)]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "no-such-model", "prompt": "x"}, 404, "not_found"),
        ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "bad_request"),
        ({"model": MODEL, "prompt": "x", "max_new_tokens": "many"}, 400, "bad_request"),
        ({"model": MODEL, "input_ids": [1, 10**9]}, 400, "bad_request"),
        ({"model": MODEL}, 400, "bad_request"),
        ({"prompt": "x"}, 400, "bad_request"),
    ],
)
def test_bad_generate_requests_get_json_errors(swarm, body, status, code):
    with pytest.raises(DaemonError) as e:
        swarm.client.request("POST", "/v1/generate", {**body, "stream": False})
    assert (e.value.status, e.value.code) == (status, code)


def test_malformed_bodies_do_not_take_the_daemon_down(swarm):
    import http.client
    import socket

    for payload in (b"{not json", b"[1, 2]", b"\xff\xfe", b'{"model": ' + b"[" * 100000):
        conn = http.client.HTTPConnection("localhost")
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.sock.connect(str(swarm.socket))
        conn.request("POST", "/v1/chat/completions", body=payload, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 400 and "error" in json.loads(r.read())
        conn.close()
    assert swarm.client.status()["peer_id"]


def openai_client(socket_path: Path):
    import httpx
    import openai

    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=120)
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)


def test_openai_client_completions_and_chat(swarm, model, tokenizer):
    client = openai_client(swarm.socket)
    assert MODEL in [m.id for m in client.models.list().data]
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = tokenizer("The capital of France is")["input_ids"]
    want = tokenizer.decode(reference(model[1], ids, 6), skip_special_tokens=True)
    assert done.choices[0].text == want and done.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
    )
    assert streamed == want
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_petalctl(swarm, tokenizer):
    runner = CliRunner()
    sock = ["--socket", str(swarm.socket)]
    r = runner.invoke(cli, [*sock, "generate", "-m", MODEL, "The capital of France is", "--max-new-tokens", "6"])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(
        cli, [*sock, "generate", "-m", MODEL, "The capital of France is", "--max-new-tokens", "6", "--json"]
    )
    assert r2.exit_code == 0, r2.output
    final = json.loads(r2.output.strip().splitlines()[-1])
    assert final["done"] and r.output.rstrip("\n") == final["text"]
    for args in (["status"], ["swarm", "-m", MODEL], ["route", "-m", MODEL], ["models", "list"]):
        r = runner.invoke(cli, [*sock, *args])
        assert r.exit_code == 0, (args, r.output)
    r = runner.invoke(cli, [*sock, "--json", "route", "-m", MODEL])
    assert [(h["start"], h["end"]) for h in json.loads(r.output)["chain"]] == [(0, 3), (3, 6)]
    r = runner.invoke(cli, [*sock, "generate", "-m", "nope", "x"])
    assert r.exit_code == 1 and "petalctl models pull nope" in r.output
    r = runner.invoke(cli, [*sock, "models", "pull", "nope"])  # streamed pull: the error arrives in-band
    assert r.exit_code == 1 and "unknown model 'nope'" in r.output, r.output
    r = runner.invoke(cli, ["--socket", "/tmp/petal-no-such.sock", "status"])
    assert r.exit_code == 2 and "petald --new-swarm" in r.output


# --- the OpenAPI file describes what the daemon really sends -----------------------------------------------------


def raw(socket_path: Path, method: str, path: str, body: object = None) -> tuple[int, str, bytes]:
    import http.client
    import socket

    conn = http.client.HTTPConnection("localhost", timeout=120)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(socket_path))
    conn.request(
        method, path, body=None if body is None else json.dumps(body), headers={"Content-Type": "application/json"}
    )
    r = conn.getresponse()
    out = r.status, (r.getheader("Content-Type") or "").split(";")[0], r.read()
    conn.close()
    return out


def test_responses_match_docs_api_yaml(swarm):
    import jsonschema
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())

    def check(method: str, template: str, path: str, body: object = None) -> None:
        op = spec["paths"][template][method.lower()]
        if body is not None:
            request_schema = op["requestBody"]["content"]["application/json"]["schema"]
            jsonschema.validate(body, {**request_schema, "components": spec["components"]})
        status, ctype, data = raw(swarm.socket, method, path, body)
        response = op["responses"][str(status)]
        if "$ref" in response:
            response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        schema = {**response["content"][ctype]["schema"], "components": spec["components"]}
        if ctype == "application/x-ndjson":
            items = [json.loads(line) for line in data.splitlines() if line.strip()]
        elif ctype == "text/event-stream":
            events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            items = [json.loads(e) for e in events[:-1]]
        else:
            items = [json.loads(data)]
        assert items
        for item in items:
            jsonschema.validate(item, schema)

    check("GET", "/v1/status", "/v1/status")
    check("GET", "/v1/models", "/v1/models")
    check("GET", "/v1/swarm", "/v1/swarm")
    check("GET", "/v1/swarm", f"/v1/swarm?model={MODEL}")
    check("GET", "/v1/route", f"/v1/route?model={MODEL}")
    check("GET", "/v1/route", "/v1/route?model=nope")
    check("GET", "/v1/dht/{key}", "/v1/dht/_models")
    check("POST", "/v1/generate", "/v1/generate", {"model": MODEL, "prompt": "Hello", "max_new_tokens": 3})
    check(
        "POST",
        "/v1/generate",
        "/v1/generate",
        {"model": MODEL, "input_ids": [1, 2], "max_new_tokens": 3, "stream": False, "stop": "x"},
    )
    check("POST", "/v1/generate", "/v1/generate", {"model": "nope", "prompt": "x"})
    check("POST", "/v1/completions", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3})
    check(
        "POST", "/v1/completions", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    )
    check(
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    check(
        "POST",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
    )
    check("POST", "/v1/models/pull", "/v1/models/pull", {"name": "no-such-model"})
