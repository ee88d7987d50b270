"""A bounded, seeded fuzz of every endpoint in docs/api.yaml against one real daemon (issue #16).

The daemon serves a tiny random 2-block Llama to itself, so valid-looking requests reach real generation, forward,
backward and session code. Requests are built from a seeded random generator: malformed JSON and msgpack, wrong
types, huge and non-finite numbers, lone surrogates, hostile tensors, odd content types and raw socket garbage.
Every answer must be non-``internal``, every error body JSON, and the daemon must still answer ``/v1/status``.
Seeded (``PETAL_FUZZ_SEED``, default 16), bounded in count (``PETAL_FUZZ_REQUESTS``, default 1500) and in time
(``PETAL_FUZZ_SECONDS``, default 40 s); ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
import yaml

from tests.support.daemons import Daemon, Swarm, wait_for_route
from tests.support.rawhttp import Reply, raw, request
from tests.support.tinymodels import tiny_llama

SEED = int(os.environ.get("PETAL_FUZZ_SEED", "16"))
REQUESTS = int(os.environ.get("PETAL_FUZZ_REQUESTS", "1500"))
SECONDS = float(os.environ.get("PETAL_FUZZ_SECONDS", "40"))
MODEL = "tiny"
BLOCKS = 2
HIDDEN = 32
SPEC = Path(__file__).resolve().parents[2] / "docs" / "api.yaml"
MSGPACK_PATHS = {"/v1/forward", "/v1/backward", "/v1/sessions/{id}/step"}
MAX_OPEN_SESSIONS = 3
NEVER = {"smollm2"}  # a known model: pulling it would download it


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    models = Path(tempfile.mkdtemp(prefix="petal-fm-", dir="/tmp"))
    root = Path(tempfile.mkdtemp(prefix="petal-f-", dir="/tmp"))
    tiny_llama(num_hidden_layers=BLOCKS, hidden_size=HIDDEN, intermediate_size=64).save_pretrained(
        models / MODEL, safe_serialization=True
    )
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text('{"model_type": "nosuch"}')
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


def endpoints() -> list[tuple[str, str]]:
    """(method, path template) of every operation in docs/api.yaml."""
    spec = yaml.safe_load(SPEC.read_text())
    ops = []
    for path, item in spec["paths"].items():
        for method in ("get", "put", "post", "delete"):
            if method in item:
                ops.append((method.upper(), path))
    return ops


# --- hostile values -----------------------------------------------------------------------------------------------


class Raw(str):
    """JSON text inserted as is (NaN, Infinity, 1e999, "\\ud800", ...): what json.dumps cannot write."""


RAW_JSON = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"\\ud800"', '"a\\udfffb"', '"\\u0000"', "1" * 5000]
NAMES = [
    MODEL,
    "broken",
    "nosuch",
    "",
    "a" * 300,
    "~nosuchuser",
    "~root",
    "..",
    ".",
    "/",
    "tiny/.",
    "tiny/..",
    "/etc/passwd",
    "x" * 5000,
    "nul\u0000",
    "\u202e",
    "é" * 200,
    "_models",
]


def hostile_scalar(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            False,
            0,
            -1,
            1,
            2,
            2**31,
            2**63 - 1,
            2**63,
            2**64,
            -(2**63) - 1,
            10**40,
            0.0,
            -0.0,
            1e-300,
            5e-324,
            1e300,
            -1e300,
            0.5,
            1.5,
            "",
            "x",
            "0:1",
            "0:2",
            ":",
            " ",
            "\u00ff" * 10,
            "\U0001f600",
            "a" * rng.choice([10, 300, 5000]),
            Raw(rng.choice(RAW_JSON)),
            rng.choice(NAMES),
        ]
    )


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.12:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 4 and roll < 0.22:
        return {rng.choice(["a", "model", "", "\u00e9", "st"]): hostile_value(rng, depth + 1) for _ in range(3)}
    if roll < 0.25:
        return [[[[[[[[1]]]]]]]] * rng.randint(1, 3)
    return hostile_scalar(rng)


def to_json(obj: Any) -> str:
    """JSON text, with ``Raw`` values written as they are (so NaN and lone surrogates reach the daemon)."""
    if isinstance(obj, Raw):
        return str(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(to_json(v) for v in obj) + "]"
    if isinstance(obj, bytes):  # a tensor's data, in a JSON body: a string that is no tensor data
        return json.dumps(obj[:64].hex())
    return json.dumps(obj)


def to_msgpack_safe(obj: Any) -> Any:
    """``obj`` with what msgpack cannot pack (Raw, ints beyond 64 bits) replaced."""
    if isinstance(obj, Raw):
        return str(obj)
    if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**64:
        return 2**64 - 1
    if isinstance(obj, dict):
        return {str(k): to_msgpack_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_msgpack_safe(v) for v in obj]
    return obj


# --- bodies -------------------------------------------------------------------------------------------------------

EXTRA_FIELDS = ["model", "prompt", "messages", "input_ids", "max_length", "batch", "start", "end", "codec"]
EXTRA_FIELDS += ["allowed", "blocked", "lora", "blocks", "num_blocks", "max_new_tokens", "max_tokens"]
GEN_FIELDS = ["temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream", "chat", "n"]
GEN_FIELDS += ["logprobs", "top_logprobs", "echo", "logit_bias", "presence_penalty", "frequency_penalty"]
GEN_FIELDS += ["stream_options", "input", "encoding_format"]


def base_body(path: str, rng: random.Random) -> dict[str, Any]:
    """A valid-looking body for ``path`` (generation asks for at most a few tokens, to keep the run short)."""
    tokens = rng.choice([1, 2, 3])
    if path == "/v1/generate":
        body: dict[str, Any] = {"model": MODEL, "input_ids": [1, 2, 3], "max_new_tokens": tokens}
    elif path == "/v1/completions":
        body = {"model": MODEL, "prompt": [1, 2], "max_tokens": tokens}
    elif path == "/v1/chat/completions":
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    elif path == "/v1/embeddings":
        body = {"model": MODEL, "input": rng.choice([[1, 2], [[1], [2, 3]]])}
    elif path == "/v1/dht/{key}":
        body = {"value": {"a": 1}}
    elif path == "/v1/models/pull":
        body = {"name": "nosuch"}
    elif path == "/v1/serve":
        body = {"model": MODEL, "blocks": "0:1"}
    elif path == "/v1/unserve":
        body = {"model": "nosuch"}
    elif path == "/v1/sessions":
        body = {"model": MODEL, "max_length": rng.choice([4, 8])}
    else:  # forward, backward, step
        body = {"model": MODEL, "hidden": tensor(rng, valid=True)}
        if path == "/v1/backward":
            body["grad"] = tensor(rng, valid=True)
    return body


def tensor(rng: random.Random, valid: bool = False) -> Any:
    shape = [1, rng.choice([1, 2]), HIDDEN]
    dtype, codec = "float32", "none"
    if not valid:
        roll = rng.random()
        if roll < 0.3:
            shape = rng.choice(
                [[0, 2**63], [0, 2**64 - 1], [-1, 1, HIDDEN], [0] * 17, [1] * 40, [2**40, 2**40, 0], [], [0]]
            )
        elif roll < 0.45:
            dtype = rng.choice(["float64", "int64", "bool", "uint8", "", None, 7, "bfloat16"])
        elif roll < 0.6:
            codec = rng.choice(["q8", "float16", "zstd", None, 1])
        elif roll < 0.7:
            return hostile_value(rng)
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) and 0 <= d < 2**20 else 0
    data = rng.randbytes(min(4 * n, 1 << 16))
    if not valid and rng.random() < 0.3:
        data = data[: rng.randint(0, len(data))] if data else b"\x00" * rng.randint(1, 9)
    t: dict[str, Any] = {"dtype": dtype, "shape": shape, "codec": codec, "data": data}
    if codec == "q8":
        t["absmax"] = rng.choice([b"", b"\x00\x00\xc0\x7f", rng.randbytes(8)])
        t["block"] = rng.choice([0, 1, 64, 2**40, -1, "64"])
    if not valid and rng.random() < 0.1:
        t[rng.choice(["extra", "data", "shape"])] = hostile_value(rng)
    return t


def mutate(body: dict[str, Any], path: str, rng: random.Random) -> dict[str, Any]:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        key = rng.choice([*body, *GEN_FIELDS, *EXTRA_FIELDS])
        if roll < 0.15 and body:
            body.pop(rng.choice(list(body)))
        elif roll < 0.35 and path in MSGPACK_PATHS | {"/v1/sessions"}:
            body[rng.choice(["hidden", "grad", "mask", "prompts"])] = tensor(rng)
        elif roll < 0.45:
            body["messages"] = rng.choice(
                [[], [{"role": "user"}], [{"role": hostile_value(rng), "content": hostile_value(rng)}], "hi", [1]]
            )
        elif roll < 0.55:
            body["lora"] = rng.choice([{}, {"x": tensor(rng)}, [], {"rank": 2**70}, hostile_value(rng)])
        else:
            body[key] = hostile_value(rng)
    for never in ("model", "name"):
        if isinstance(body.get(never), str) and body[never] in NEVER:
            body[never] = "nosuch"
    if path == "/v1/unserve" and body.get("model") == MODEL:
        body["model"] = "nosuch"  # keep serving: the rest of the run needs the model
    for tokens in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        if tokens in body and isinstance(body[tokens], int) and 4 < body[tokens] <= 4096:
            body[tokens] = 4  # long generations would only slow the run down
    body.setdefault("max_new_tokens", 2)
    body.setdefault("max_tokens", 2)
    return body


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=bogus",
    "application/json; charset=rot13",
    "application/json; charset=utf-16",
    "application/json; charset=",
    "application/json;;;=;",
    "text/plain",
    "application/x-msgpack",
    "application/x-msgpack; charset=bogus",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "",
    "\u00ff/\u00ff",
]


@dataclass
class Case:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent as is instead of an HTTP request


def path_param(rng: random.Random, sessions: list[str]) -> str:
    if sessions and rng.random() < 0.5:
        return rng.choice(sessions)
    return quote(
        rng.choice(["k", "x" * 700, "_models", "tiny.0", "%ED%A0%80", "..", "\u00e9", "a/b", "\u0000", " "]), safe=""
    )


def make_case(rng: random.Random, ops: list[tuple[str, str]], sessions: list[str]) -> Case:
    if rng.random() < 0.06:
        return Case("", "", b"", raw=raw_garbage(rng))
    method, template = rng.choice(ops)
    path = template.replace("{key}", path_param(rng, sessions)).replace("{id}", path_param(rng, sessions))
    if method == "GET" and rng.random() < 0.7:
        path += "?model=" + quote(str(rng.choice([*NAMES, "%ED%A0%80", "\ud800"])), safe="%", errors="surrogatepass")
    if method in ("GET", "DELETE"):
        return Case(method, path, b"", {"Accept": rng.choice(["application/x-msgpack", "*/*"])})
    msgpack_path = template in MSGPACK_PATHS or (template == "/v1/sessions" and rng.random() < 0.5)
    body = mutate(base_body(template, rng), template, rng) if rng.random() < 0.85 else base_body(template, rng)
    roll = rng.random()
    if msgpack_path:
        ctype = "application/x-msgpack"
        data = msgpack.packb(to_msgpack_safe(body), use_bin_type=True)
        if roll < 0.1:
            data = data[: rng.randint(0, len(data))]
        elif roll < 0.15:
            data = msgpack.packb(rng.choice([[1, 2], "x", msgpack.ExtType(5, b"x"), 7]), use_bin_type=True)
        elif roll < 0.2:
            data = b"\xc1" + rng.randbytes(rng.randint(0, 64))
        elif roll < 0.25:
            data = b"\x91" * 5000 + b"\xc0"  # nested 5000 deep
    else:
        ctype = "application/json"
        data = to_json(body).encode("utf-8", "surrogatepass")
        if roll < 0.08:
            data = data[: rng.randint(0, len(data))]
        elif roll < 0.12:
            data = b"[" * 100000
        elif roll < 0.16:
            data = rng.randbytes(rng.randint(0, 200))
        elif roll < 0.2:
            data = rng.choice([b"[]", b"null", b"1", b'"x"', b"{}", b'{"model": "tiny\xff"}'])
    if rng.random() < 0.25:
        ctype = rng.choice(CONTENT_TYPES)
    headers = {"Content-Type": ctype}
    if rng.random() < 0.05:
        # a wrong length: the body is sent and the connection half-closed, as by a client that gave up
        headers["Content-Length"] = rng.choice(["-1", "99999999999", "abc", str(len(data) + 10), "1, 2"])
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return Case(method, path, data, headers, raw=head.encode("utf-8", "surrogatepass") + b"\r\n" + data)
    return Case(method, path, data, headers)


def raw_garbage(rng: random.Random) -> bytes:
    return rng.choice(
        [
            rng.randbytes(rng.randint(1, 300)),
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + rng.randbytes(50) + b"\r\n\r\n",
            b"POST /v1/generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + rng.randbytes(20) + b"\r\n\r\n",
            b"GET /" + b"a" * rng.choice([100, 9000, 70000]) + b" HTTP/1.1\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nX: " + b"b" * 70000 + b"\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(40),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"GET /v1/status HTTP/1.1\r\n\x00\x01\x02: y\r\n\r\n",
            b"BREW /v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
    )


# --- checking answers ---------------------------------------------------------------------------------------------


def stream_errors(reply: Reply) -> list[dict[str, Any]]:
    """In-band ``{"error"}`` lines of an NDJSON or SSE stream."""
    out = []
    for line in reply.body.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data: "):
            line = line[6:]
        if not line.startswith(b"{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            out.append(obj["error"])
    return out


@dataclass
class Tally:
    tried: int = 0
    raw_tried: int = 0
    internal: int = 0
    not_json: int = 0
    crashes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)  # per endpoint, to see where the time goes
    failures: list[str] = field(default_factory=list)

    def fail(self, what: str, case: Case, reply: Reply) -> None:
        if len(self.failures) < 10:
            sent = case.raw[:200] if case.raw is not None else (case.method, case.path[:100], case.body[:300])
            self.failures.append(f"{what}: sent {sent!r} got {reply.status} {reply.body[:300]!r}")


def check(reply: Reply, case: Case, tally: Tally) -> None:
    tally.statuses[reply.status] += 1
    if reply.status == 0:
        return  # closed without an answer (raw garbage the parser gave up on): no reply to judge
    if reply.status >= 400 and (not reply.content_type.startswith("application/json") or reply.error is None):
        tally.not_json += 1
        tally.fail("error not in JSON", case, reply)
        return
    if reply.status >= 500 and reply.status not in (502, 503, 504):
        tally.internal += 1
        tally.fail("5xx", case, reply)
        return
    errors = [reply.error] if reply.status >= 400 else stream_errors(reply)
    if any(e is not None and e.get("code") == "internal" for e in errors):
        tally.internal += 1
        tally.fail("internal", case, reply)


def send(d: Daemon, case: Case) -> Reply:
    if case.raw is not None:
        return raw(d.socket, case.raw, timeout=30, wait=0.5)  # garbage is answered at once; a short body never
    return request(d.socket, case.method, case.path, case.body, case.headers, timeout=60)


def test_fuzz_every_endpoint(daemon: Daemon) -> None:
    rng = random.Random(SEED)
    ops = endpoints()
    assert len(ops) >= 17, ops  # every operation of docs/api.yaml
    tally = Tally()
    sessions: list[str] = []
    deadline = time.monotonic() + SECONDS
    while tally.tried < REQUESTS and time.monotonic() < deadline:
        case = make_case(rng, ops, sessions)
        tally.tried += 1
        tally.raw_tried += case.raw is not None
        t0 = time.monotonic()
        try:
            reply = send(daemon, case)
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError) as e:
            tally.crashes += 1
            tally.fail(f"no answer ({type(e).__name__})", case, Reply(0, "", b""))
            if daemon.proc is not None and daemon.proc.poll() is not None:
                break
            continue
        tally.seconds[case.path.split("?")[0] if case.raw is None else "raw"] += time.monotonic() - t0
        check(reply, case, tally)
        if case.path == "/v1/sessions" and reply.status == 200:
            sid = _session_id(reply)
            if sid:
                sessions.append(sid)
            while len(sessions) > MAX_OPEN_SESSIONS:  # each holds server cache: close the oldest
                request(daemon.socket, "DELETE", f"/v1/sessions/{sessions.pop(0)}")
    alive = daemon.proc is not None and daemon.proc.poll() is None
    print(
        f"\nfuzz: {tally.tried} requests tried ({tally.raw_tried} raw socket garbage), {tally.internal} internal "
        f"errors, {tally.not_json} non-JSON errors, {tally.crashes + (not alive)} crashes; "
        f"statuses {dict(sorted(tally.statuses.items()))}"
    )
    slow = sorted(tally.seconds.items(), key=lambda kv: -kv[1])[:5]
    print("fuzz: slowest endpoints (s): " + ", ".join(f"{p[:40]} {t:.1f}" for p, t in slow))
    assert alive, daemon.log()[-3000:]
    assert daemon.status()["peer_id"]
    assert tally.internal == tally.not_json == tally.crashes == 0, "\n".join(tally.failures)
    assert tally.tried >= min(REQUESTS, 200)


def _session_id(reply: Reply) -> str | None:
    decode: Callable[[bytes], Any] = msgpack.unpackb if "msgpack" in reply.content_type else json.loads
    try:
        sid = decode(reply.body).get("session")
    except (ValueError, AttributeError, msgpack.UnpackException):
        return None
    return sid if isinstance(sid, str) else None
