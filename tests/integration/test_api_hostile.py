"""Hostile requests on a real daemon's socket (issue #16, findings 1-6 and 15): each is a clear 4xx JSON error,
never ``internal``, and the daemon keeps serving.

One daemon serves a tiny random 2-block Llama to itself (so generation, forward and sessions really run); its
models dir also holds broken model dirs (invalid config.json, unknown model_type, a list for a config).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from petal.protocol.records import MAX_RECORD_BYTES
from petal.protocol.socket_api import MAX_PROMPT_BYTES, MSGPACK
from tests.support.daemons import Daemon, Swarm, wait_for_route
from tests.support.rawhttp import Reply, raw, request
from tests.support.tinymodels import tiny_llama

MODEL = "tiny"
BLOCKS = 2
HIDDEN = 32
JSON_TYPE = "application/json"
GENERATION = ["/v1/generate", "/v1/completions", "/v1/chat/completions"]
JSON_ENDPOINTS = [*GENERATION, "/v1/serve", "/v1/unserve", "/v1/models/pull", "/v1/sessions"]


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    models = Path(tempfile.mkdtemp(prefix="petal-hm-", dir="/tmp"))
    root = Path(tempfile.mkdtemp(prefix="petal-h-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    tiny_llama(num_hidden_layers=BLOCKS, hidden_size=HIDDEN, intermediate_size=64).save_pretrained(
        models / MODEL, safe_serialization=True
    )
    for name, config in (("badjson", "{nope"), ("badtype", '{"model_type": "nosuch"}'), ("listcfg", "[1, 2]")):
        (models / name).mkdir()
        (models / name / "config.json").write_text(config)
    s = Swarm(root)
    try:
        d = s.make("d", "--new-swarm", "--serve", MODEL, "--blocks", f"0:{BLOCKS}").start(
            extra_env={"PETAL_MODELS_DIR": str(models)}
        )
        wait_for_route(d, MODEL, BLOCKS)
        yield d
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(models, ignore_errors=True)


def post(d: Daemon, path: str, body: object, content_type: str = JSON_TYPE, method: str = "POST") -> Reply:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return request(d.socket, method, path, data, {"Content-Type": content_type})


def assert_error(reply: Reply, status: int | tuple[int, ...], code: str | None = None, says: str = "") -> str:
    """A JSON error with one of ``status``; returns its message."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert reply.status in statuses, (reply.status, reply.body[:500])
    assert reply.content_type.startswith(JSON_TYPE), (reply.content_type, reply.body[:300])
    err = reply.error
    assert err is not None and err["code"] != "internal", reply.body[:500]
    if code is not None:
        assert err["code"] == code, err
    assert says.lower() in err["message"].lower(), err
    return str(err["message"])


def body_for(path: str, **fields: object) -> dict[str, object]:
    """A minimal valid body for a generation endpoint, with ``fields`` replacing or adding fields."""
    base: dict[str, object] = {"model": MODEL, "max_new_tokens": 2, "max_tokens": 2, "stream": False}
    if path == "/v1/chat/completions":
        base["messages"] = [{"role": "user", "content": "hi"}]
    elif path == "/v1/completions":
        base["prompt"] = [1, 2, 3]
    else:
        base["input_ids"] = [1, 2, 3]
    if path in ("/v1/serve", "/v1/unserve", "/v1/sessions"):
        base = {"model": "nosuch-model", "max_length": 8}
    if path == "/v1/models/pull":
        base = {"name": "nosuch-model"}
    return {**base, **fields}


def tensor(shape: list[int], dtype: str = "float32", data: bytes | None = None) -> dict[str, object]:
    n = 1
    for dim in shape:
        n *= dim
    return {"dtype": dtype, "shape": shape, "codec": "none", "data": b"\0" * (4 * n) if data is None else data}


def test_the_tiny_model_generates(daemon: Daemon) -> None:
    """The setup works: a valid request is answered (so the 4xx below are about the input, not the setup)."""
    r = post(daemon, "/v1/generate", body_for("/v1/generate"))
    assert r.status == 200, r.body[:500]
    assert len(r.json()["tokens"]) == 2


# --- finding 1: Content-Type parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
@pytest.mark.parametrize("charset", ["bogus", "rot13", "utf-99", "x" * 300])
def test_a_bad_charset_is_a_400(daemon: Daemon, path: str, charset: str) -> None:
    r = post(daemon, path, body_for(path), content_type=f"application/json; charset={charset}")
    assert_error(r, 400, "bad_request")


def test_a_known_charset_other_than_utf8_is_read(daemon: Daemon) -> None:
    body = json.dumps(body_for("/v1/generate")).encode("utf-16")
    r = post(daemon, "/v1/generate", body, content_type="application/json; charset=utf-16")
    assert r.status == 200, r.body[:300]


def test_a_bad_content_type_on_a_tensor_endpoint_is_a_400(daemon: Daemon) -> None:
    for ct in ("application/x-msgpack; charset=bogus", "text/plain; charset=bogus", ";;;", "application/json"):
        assert_error(post(daemon, "/v1/forward", b"\x80", content_type=ct), 400)


# --- finding 2: model names that are no model -------------------------------------------------------------------

BAD_NAMES = {
    "a" * 300: (400, "at most 255 bytes"),
    "x/" + "b" * 256: (400, "at most 255 bytes"),
    "/" + "c/" * 3000: (400, "at most"),
    "~nosuchuser": (404, "not in the local models dir"),
    "~nosuchuser/model": (404, "not in the local models dir"),
    "..": (404, ""),
    ".": (404, ""),
    "tiny/../tiny/../../..": (404, ""),
    "/etc": (404, ""),
    "nul\u0000byte": (400, "nul"),
    "badjson": (404, "not a usable model dir"),
    "badtype": (404, "not a usable model dir"),
    "listcfg": (404, "not a usable model dir"),
}


@pytest.mark.parametrize("path", GENERATION)
@pytest.mark.parametrize("name", list(BAD_NAMES), ids=lambda n: repr(n[:20]))
def test_a_bad_model_name_is_a_clear_4xx_on_generation(daemon: Daemon, path: str, name: str) -> None:
    status, says = BAD_NAMES[name]
    assert_error(post(daemon, path, body_for(path, model=name)), status, says=says)


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=lambda n: repr(n[:20]))
def test_a_bad_model_name_is_a_clear_4xx_on_serve_pull_and_tensors(daemon: Daemon, name: str) -> None:
    assert_error(post(daemon, "/v1/serve", {"model": name}), (400, 404, 409))
    assert_error(post(daemon, "/v1/unserve", {"model": name}), (400, 404))
    assert_error(post(daemon, "/v1/models/pull", {"name": name}), (400, 404))
    assert_error(post(daemon, "/v1/sessions", {"model": name, "max_length": 8}), (400, 404, 503))
    fwd = msgpack.packb({"model": name, "hidden": tensor([1, 1, HIDDEN])}, use_bin_type=True)
    assert_error(post(daemon, "/v1/forward", fwd, content_type=MSGPACK), (400, 404, 503))


# --- finding 3: lone surrogates ---------------------------------------------------------------------------------

SURROGATE_BODIES = {
    "/v1/generate": {"prompt": "\ud800", "input_ids": None},
    "/v1/completions": {"prompt": "a\udfffb"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "\ud800"}]},
}


@pytest.mark.parametrize("path", GENERATION)
@pytest.mark.parametrize("where", ["prompt", "stop", "model", "key"])
def test_a_lone_surrogate_anywhere_is_a_400(daemon: Daemon, path: str, where: str) -> None:
    fields: dict[str, object] = {
        "prompt": SURROGATE_BODIES[path],
        "stop": {"stop": ["ok", "\ud83d"]},
        "model": {"model": "tiny\udc00"},
        "key": {"\ud800": 1},
    }[where]
    body = json.dumps(body_for(path, **fields))  # ensure_ascii: the surrogate travels as a \\ud800 escape
    assert_error(post(daemon, path, body), 400, "bad_request", "surrogate")


def test_a_surrogate_pair_is_fine(daemon: Daemon) -> None:
    r = post(daemon, "/v1/generate", json.dumps(body_for("/v1/generate", stop=["\U0001f600"])))
    assert r.status == 200, r.body[:300]


def test_invalid_utf8_is_a_400(daemon: Daemon) -> None:
    assert_error(post(daemon, "/v1/generate", b'{"model": "tiny\xed\xa0\x80"}'), 400, "bad_request")


# --- finding 4: sampling numbers ---------------------------------------------------------------------------------

BAD_SAMPLING = [
    {"temperature": "NaN"},
    {"temperature": "Infinity"},
    {"temperature": "-Infinity"},
    {"top_p": "1e999"},
    {"temperature": -1e-300},
    {"temperature": 1e300},
    {"top_p": 0},
    {"top_p": 1.5},
    {"top_k": -1},
    {"repetition_penalty": 0},
    {"repetition_penalty": 1e-300},
    {"repetition_penalty": 1e300},
    {"seed": 18446744073709551616},
    {"seed": 2**63},
    {"seed": -1},
    {"seed": 1.5},
    {"max_new_tokens": 10**30, "max_tokens": 10**30},
    {"temperature": 10**400},
    {"stop": [""]},
    {"stop": ["x"] * 100},
]


@pytest.mark.parametrize("path", GENERATION)
@pytest.mark.parametrize("fields", BAD_SAMPLING, ids=lambda f: json.dumps(f)[:40])
def test_bad_sampling_numbers_are_a_400(daemon: Daemon, path: str, fields: dict[str, object]) -> None:
    text = json.dumps(body_for(path, **fields))
    for constant in ("NaN", "Infinity", "-Infinity", "1e999"):  # what Python's json writes for non-finite floats
        text = text.replace(f'"{constant}"', constant)
    assert_error(post(daemon, path, text), 400, "bad_request")


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])  # chat needs a tokenizer; tiny has none
def test_a_tiny_temperature_samples_greedily(daemon: Daemon, path: str) -> None:
    """A temperature too small to divide by (1e-300 overflowed the probabilities to NaN) means greedy."""
    greedy = post(daemon, path, body_for(path, temperature=0, max_new_tokens=4, max_tokens=4))
    tiny = post(daemon, path, body_for(path, temperature=1e-300, seed=2**63 - 1, max_new_tokens=4, max_tokens=4))
    assert greedy.status == tiny.status == 200, (greedy.body[:300], tiny.body[:300])
    if path == "/v1/generate":
        assert tiny.json()["tokens"] == greedy.json()["tokens"]


# --- finding 5: tensor shapes that overflow ---------------------------------------------------------------------

BAD_SHAPES = [
    [0, 2**63],
    [2**63, 0, 1],
    [0, 2**64 - 1],
    [0, 2**62, 2**62],
    [-1, 1, HIDDEN],
    [0] * 17,
    [1] * 64,
    [0, 2**40 + 1],
]


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=str)
def test_a_hostile_tensor_shape_is_a_400_on_every_tensor_endpoint(daemon: Daemon, shape: list[int]) -> None:
    bad = tensor(shape, data=b"")
    good = tensor([1, 2, HIDDEN])
    bodies = {
        "/v1/forward": {"model": MODEL, "hidden": bad},
        "/v1/backward": {"model": MODEL, "hidden": good, "grad": bad},
        "/v1/sessions": {"model": MODEL, "max_length": 8, "prompts": bad},
    }
    for path, body in bodies.items():
        r = post(daemon, path, msgpack.packb(body, use_bin_type=True), content_type=MSGPACK)
        assert_error(r, 400, "bad_tensor")
    opened = post(daemon, "/v1/sessions", msgpack.packb({"model": MODEL, "max_length": 8}, use_bin_type=True), MSGPACK)
    assert opened.status == 200, opened.body[:300]
    sid = msgpack.unpackb(opened.body)["session"]
    try:
        step = msgpack.packb({"hidden": bad}, use_bin_type=True)
        assert_error(post(daemon, f"/v1/sessions/{sid}/step", step, MSGPACK), 400, "bad_tensor")
        ok = post(daemon, f"/v1/sessions/{sid}/step", msgpack.packb({"hidden": good}, use_bin_type=True), MSGPACK)
        assert ok.status == 200, ok.body[:300]  # the session survived the bad step
    finally:
        request(daemon.socket, "DELETE", f"/v1/sessions/{sid}")


# --- finding 6: DHT values the signer refuses --------------------------------------------------------------------


def _announced(d: Daemon) -> list[str]:
    return list(d.status()["announced"])


BAD_VALUES = {
    "too big": ({"a": "v" * MAX_RECORD_BYTES}, 413),
    "too deep": ({"a": [[[[[[1]]]]]]}, 400),
    "int >= 2**64": ({"a": 2**64}, 400),
    "int < -2**63": ({"a": -(2**63) - 1}, 400),
    "NaN": ('{"value": {"a": NaN}}', 400),
    "1e999": ('{"value": {"a": 1e999}}', 400),
    "surrogate key": ('{"value": {"\\ud800": 1}}', 400),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_value_the_dht_cannot_sign_is_refused_and_never_kept(daemon: Daemon, case: str) -> None:
    value, status = BAD_VALUES[case]
    key = f"hostile-{case.replace(' ', '-')}"
    body = value if isinstance(value, str) else {"value": value}
    assert_error(post(daemon, f"/v1/dht/{key}", body, method="PUT"), status)
    assert key not in _announced(daemon)  # not stored, so not re-announced every ttl/3 seconds
    r = request(daemon.socket, "DELETE", f"/v1/dht/{key}")
    assert r.status < 500, r.body[:300]


def test_a_long_key_is_refused_and_deleting_it_is_no_500(daemon: Daemon) -> None:
    key = "k" * 700
    assert_error(post(daemon, f"/v1/dht/{key}", {"value": {"a": 1}}, method="PUT"), 413, "too_large")
    assert key not in _announced(daemon)
    r = request(daemon.socket, "DELETE", f"/v1/dht/{key}")
    assert r.status < 500 and r.content_type.startswith(JSON_TYPE), r.body[:300]


def test_the_largest_signable_value_is_announced_and_withdrawn(daemon: Daemon) -> None:
    """The API's limit is the DHT's: a value that fits one record (also when marked offline) is announced."""
    size = 0
    for n in range(600, 0, -1):  # the longest string value accepted
        r = post(daemon, "/v1/dht/fits", {"value": {"a": "v" * n}}, method="PUT")
        if r.status == 200:
            size = n
            break
        assert_error(r, 413, "too_large")
    assert 400 < size < 600
    assert "fits" in _announced(daemon)
    r = request(daemon.socket, "DELETE", "/v1/dht/fits")
    assert r.status == 200, r.body[:300]
    assert "fits" not in _announced(daemon)


# --- finding 15 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GENERATION)
def test_a_huge_prompt_is_refused_before_tokenizing(daemon: Daemon, path: str) -> None:
    text = "word " * (MAX_PROMPT_BYTES // 5 + 1)
    fields: dict[str, object] = (
        {"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text, "input_ids": None}
    )
    # The tiny model has no tokenizer: reaching the tokenizer would be a different 400 ("no tokenizer").
    assert_error(post(daemon, path, body_for(path, **fields)), 413, "too_large", "bytes")


def test_a_body_over_the_limit_is_413_too_large(daemon: Daemon) -> None:
    headers = {"Content-Type": JSON_TYPE, "Content-Length": str(65 * 1024 * 1024)}
    r = request(daemon.socket, "POST", "/v1/generate", b"{}", headers)
    assert_error(r, 413, "too_large")
    headers = {"Content-Type": MSGPACK, "Content-Length": str(300 * 1024 * 1024)}
    assert_error(request(daemon.socket, "POST", "/v1/forward", b"\x80", headers), 413, "too_large")


@pytest.mark.parametrize("blocks", ["", "   ", ":", "0:", "x:y", "1:0", "0:999", "0:1:2", "-1:1"])
def test_bad_blocks_in_serve_are_a_400(daemon: Daemon, blocks: str) -> None:
    # "tiny" is already served here, so a valid span would overlap it: a 409.
    r = post(daemon, "/v1/serve", {"model": MODEL, "blocks": blocks})
    assert_error(r, (400, 409))
    if blocks.strip() == "":
        assert_error(r, 400, "bad_request", "START:END")


# --- HTTP parser errors -------------------------------------------------------------------------------------------

MALFORMED_HTTP = {
    "garbage": b"GARBAGE\r\n\r\n",
    "binary": bytes(range(256)),
    "bad method": b"G\x00T /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad version": b"GET /v1/status HTTP/9.9\r\nHost: x\r\n\r\n",
    "bad header": b"GET /v1/status HTTP/1.1\r\nHost x\r\n\r\n",
    "header with NUL": b"GET /v1/status HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
    "huge header": b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    "huge request line": b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "many headers": b"GET /v1/status HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20000)) + b"\r\n",
    "bad chunk": b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
    "chunked and length": (
        b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad length": b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "two lengths": b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
    "bad encoding": b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, zz\r\n\r\n",
    "tls hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


@pytest.mark.parametrize("case", list(MALFORMED_HTTP))
def test_an_http_parser_error_is_answered_in_json(daemon: Daemon, case: str) -> None:
    r = raw(daemon.socket, MALFORMED_HTTP[case])
    message = assert_error(r, (400, 413, 431), says="malformed HTTP request")  # was text/plain
    assert len(message) <= 600
    assert daemon.status()["peer_id"]
