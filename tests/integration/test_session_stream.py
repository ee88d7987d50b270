"""Streamed inference sessions (GET /v1/sessions/stream, a WebSocket) with real petald daemons.

Three daemons serve a tiny random 30-block Llama ([0, 10), [10, 20), [20, 30)); a fourth serves nothing and is the
client's daemon. Steps through the stream must equal steps through the HTTP endpoints and the same weights run
locally (`Span.from_model`); caller errors and hostile messages get error messages and leave the daemon (and,
for caller errors, the stream) usable; closing a stream closes its session in the daemon's registry.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import torch

from petal.ctl.client import AsyncClient, Client, DaemonError, StreamSession
from petal.ctl.websocket import OP_TEXT, WebSocket, WebSocketClosed
from petal.kernels.span import Span
from petal.protocol.socket_api import SESSION_STREAM_PATH
from petal.protocol.tensors import encode_tensor
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
HIDDEN = 32
ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    model = tiny_llama(num_hidden_layers=30, hidden_size=HIDDEN, intermediate_size=64)
    model.save_pretrained(root / MODEL, safe_serialization=True)
    yield root, model
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def swarm(models):
    """(the swarm, its first server, the daemons' environment)."""
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(models[0])}
    try:
        boot = s.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:10").start(extra_env=env)
        for name, blocks in (("s1", "10:20"), ("s2", "20:30")):
            s.make(name, "--initial-peer", boot.address, "--serve", MODEL, "--blocks", blocks).start(extra_env=env)
        yield s, boot, env
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local(swarm):
    """The client's daemon: serves nothing."""
    s, boot, env = swarm
    return s.make("c", "--initial-peer", boot.address).start(extra_env=env)


@pytest.fixture(scope="module")
def client(local) -> Client:
    return Client(local.socket, timeout=120)


def reference(model, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    with torch.no_grad():
        return Span.from_model(model, start, end)(hidden)


def open_count(client: Client) -> int:
    return int(client.get("/v1/sessions")["open"])


def wait_open_count(client: Client, want: int, deadline_s: float = 30.0) -> int:
    """The registry's count once it is `want` (a closed stream's session is closed by the daemon, not in our call)."""
    end = time.monotonic() + deadline_s
    while (n := open_count(client)) != want and time.monotonic() < end:
        time.sleep(0.05)
    return n


def raw_stream(local) -> WebSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(local.socket))
    return WebSocket.connect(sock, SESSION_STREAM_PATH)


def call(ws: WebSocket, payload: bytes) -> dict:
    ws.send(payload)
    opcode, data = ws.receive()
    assert opcode == 2  # binary
    reply = msgpack.unpackb(data)
    assert isinstance(reply, dict)
    return reply


@pytest.mark.parametrize(("start", "end"), [(0, None), (5, 17)])
def test_stream_steps_equal_http_steps_and_local_blocks(client, models, start, end):
    torch.manual_seed(2)
    hidden = torch.randn(2, 8, HIDDEN)
    want = reference(models[1], hidden, start, end or 30)
    base = open_count(client)
    with (
        client.session_stream(MODEL, max_length=8, batch=2, start=start, end=end, codec="none") as s,
        client.open_session(MODEL, max_length=8, batch=2, start=start, end=end, codec="none") as h,
    ):
        assert isinstance(s, StreamSession)
        assert (s.start, s.end, s.max_length) == (h.start, h.end, h.max_length) == (start, end or 30, 8)
        assert s.route[0]["start"] == start and s.route[-1]["end"] == (end or 30)
        assert open_count(client) == base + 2
        streamed, stepped = [s.step(hidden[:, :5])], [h.step(hidden[:, :5])]
        assert s.position == h.position == 5
        for t in range(5, 8):
            mask = torch.ones(2, t + 1, dtype=torch.long)
            streamed.append(s.step(hidden[:, t : t + 1], mask=mask))
            stepped.append(h.step(hidden[:, t : t + 1], mask=mask))
        assert s.position == 8
        torch.testing.assert_close(torch.cat(streamed, dim=1), torch.cat(stepped, dim=1), atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.cat(streamed, dim=1), want, atol=ATOL, rtol=0)
        with pytest.raises(DaemonError) as e:
            s.step(hidden[:, :1])
        assert e.value.code == "max_length"
    assert wait_open_count(client, base) == base  # closing the stream closed its session
    with pytest.raises(DaemonError) as e:
        s.step(hidden[:, :1])
    assert e.value.code == "not_found"


async def test_async_stream_equals_local_blocks(local, client, models):
    torch.manual_seed(3)
    hidden = torch.randn(1, 4, HIDDEN)
    base = open_count(client)
    async with AsyncClient(local.socket, timeout=120) as ac:
        async with await ac.session_stream(MODEL, 4, start=3, end=25, codec="none") as s:
            assert open_count(client) == base + 1
            first = await s.step(hidden[:, :2])
            with pytest.raises(DaemonError) as e:
                await s.step(torch.randn(1, 1, HIDDEN + 1))
            assert e.value.code == "wrong_shape"
            steps = torch.cat([first, await s.step(hidden[:, 2:])], dim=1)
            assert s.position == 4
        torch.testing.assert_close(steps, reference(models[1], hidden, 3, 25), atol=ATOL, rtol=0)
        with pytest.raises(DaemonError) as e:
            await ac.session_stream("no-such-model", 4)
        assert e.value.code in ("not_found", "no_route")
    assert wait_open_count(client, base) == base


def test_caller_errors_keep_the_stream_usable(client, models):
    torch.manual_seed(4)
    hidden = torch.randn(1, 3, HIDDEN)
    with client.session_stream(MODEL, max_length=4, codec="none") as s:
        for bad, code in [
            (lambda: s.step(torch.randn(1, 1, HIDDEN + 1)), "wrong_shape"),
            (lambda: s.step(torch.randn(2, 1, HIDDEN)), "wrong_shape"),  # batch 2 in a batch-1 session
            (lambda: s.step(hidden[:, :1], mask=torch.ones(1, 5, dtype=torch.long)), "wrong_shape"),
            (lambda: s.step(hidden[:, :1], mask=torch.ones(1, 1)), "bad_tensor"),  # float mask
            (lambda: s.step(torch.randn(1, 5, HIDDEN)), "max_length"),
        ]:
            with pytest.raises(DaemonError) as e:
                bad()
            assert e.value.code == code, e.value
            assert s.position == 0
        out = s.step(hidden)
        torch.testing.assert_close(out, reference(models[1], hidden, 0, 30), atol=ATOL, rtol=0)
        assert s.position == 3
    for bad_open, code in [
        (lambda: client.session_stream(MODEL, 0), "bad_request"),
        (lambda: client.session_stream(MODEL, 4, codec="zip"), "bad_request"),
        (lambda: client.session_stream(MODEL, 4, end=31), "bad_request"),
    ]:
        with pytest.raises(DaemonError) as e:
            bad_open()
        assert e.value.code == code, e.value


def test_hostile_messages_get_errors_and_never_crash(local, client, models):
    base = open_count(client)
    ws = raw_stream(local)
    try:
        # before the session is open: each bad message is answered, and the open may be sent again
        for payload in [
            b"\xc1\xc1garbage",
            msgpack.packb([1, 2, 3]),
            msgpack.packb({"model": MODEL}),  # no max_length
            msgpack.packb({"model": 7, "max_length": 4}),
            msgpack.packb({"model": MODEL, "max_length": 4, "prompts": {"dtype": "float32", "shape": [1]}}),
            b"",
        ]:
            reply = call(ws, payload)
            assert set(reply) == {"error"} and reply["error"]["code"] in ("bad_request", "bad_tensor", "wrong_shape")
        ws.send(b'{"model": "tiny-llama"}', OP_TEXT)
        assert msgpack.unpackb(ws.receive()[1])["error"]["code"] == "bad_request"
        info = call(ws, msgpack.packb({"model": MODEL, "max_length": 4, "codec": "none"}))
        assert info["end"] == 30 and open_count(client) == base + 1
        # once open: garbage, wrong types, bad tensors
        bad_tensor = {"dtype": "float32", "shape": [1, 2, HIDDEN], "codec": "none", "data": b"\0" * 7}
        for payload in [
            b"\x00\xff" * 100,
            msgpack.packb("hidden"),
            msgpack.packb({}),
            msgpack.packb({"hidden": bad_tensor}),
            msgpack.packb({"hidden": {"dtype": "evil", "shape": [1], "codec": "none", "data": b""}}),
            msgpack.packb({"hidden": encode_tensor(torch.zeros(1, 1, HIDDEN)), "mask": "x"}),
            msgpack.packb({"hidden": encode_tensor(torch.zeros(1, 1, HIDDEN, dtype=torch.int32))}),
        ]:
            reply = call(ws, payload)
            assert set(reply) == {"error"}, reply
        hidden = torch.randn(1, 2, HIDDEN)
        reply = call(ws, msgpack.packb({"hidden": encode_tensor(hidden)}))
        assert reply["position"] == 2
        # a frame over the size limit is refused from its header (no payload is sent): 1009 closes the stream
        ws.sock.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 40) + b"\0\0\0\0")
        with pytest.raises(WebSocketClosed) as e:
            ws.receive()
        assert e.value.code == 1009
    finally:
        ws.close()
    assert wait_open_count(client, base) == base  # the session of the refused stream was closed
    # a plain GET (no upgrade) is a JSON 400 that says what to send
    conn = http.client.HTTPConnection("localhost", timeout=60)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(local.socket))
    try:
        conn.request("GET", SESSION_STREAM_PATH)
        r = conn.getresponse()
        assert r.status == 400 and "WebSocket" in json.loads(r.read())["error"]["message"]
    finally:
        conn.close()
    # a client that vanishes without a close frame: the daemon closes its session
    ws = raw_stream(local)
    call(ws, msgpack.packb({"model": MODEL, "max_length": 4}))
    assert open_count(client) == base + 1
    ws.sock.close()
    assert wait_open_count(client, base) == base
    with client.session_stream(MODEL, max_length=2, codec="none") as s:
        h = torch.randn(1, 2, HIDDEN)
        torch.testing.assert_close(s.step(h), reference(models[1], h, 0, 30), atol=ATOL, rtol=0)
    assert "Traceback" not in local.log()


def test_a_daemon_stopping_closes_its_streams(swarm):
    """SIGTERM with a stream open: the daemon closes the stream (1001) and its session, and exits cleanly."""
    s, boot, env = swarm
    other = s.make("c2", "--initial-peer", boot.address).start(extra_env=env)
    stream = Client(other.socket, timeout=120).session_stream(MODEL, max_length=4, codec="none")
    assert stream.step(torch.randn(1, 1, HIDDEN)).shape == (1, 1, HIDDEN)
    assert other.stop() == 0  # None would mean it had to be killed
    with pytest.raises(DaemonError) as e:
        stream.step(torch.randn(1, 1, HIDDEN))
    assert e.value.code == "unavailable" and "1001" in e.value.message
    stream.close()
    assert "Traceback" not in other.log()


def test_docs_describe_the_stream(client):
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())
    assert "get" in spec["paths"][SESSION_STREAM_PATH]
    import jsonschema

    op = spec["paths"]["/v1/sessions"]["get"]
    schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(client.get("/v1/sessions"), {**schema, "components": spec["components"]})
