"""Tensor endpoints, inference sessions and runtime serve/unserve on the control socket, with real petald daemons.

Three daemons serve a tiny random 30-block Llama ([0, 10), [10, 20), [20, 30)); a fourth serves nothing and is
the client's local daemon: everything goes through its socket with `Client`/`AsyncClient`. References are the
same weights run locally (`Span.from_model`, checked against transformers in test_kernels_span.py); the wire codec
is "none", so results match to float32 rounding.
"""

from __future__ import annotations

import http.client
import itertools
import json
import shutil
import socket
import tempfile
from pathlib import Path

import msgpack
import pytest
import torch

from petal.ctl.client import AsyncClient, Client, DaemonError
from petal.kernels.span import Span
from petal.protocol.tensors import encode_tensor
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-llama"
EXTRA = "tiny-extra"  # served at runtime by the client daemon
HIDDEN = 32
ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    root = Path(tempfile.mkdtemp(prefix="petal-m-", dir="/tmp"))
    model = tiny_llama(num_hidden_layers=30, hidden_size=HIDDEN, intermediate_size=64)
    model.save_pretrained(root / MODEL, safe_serialization=True)
    tiny_llama(seed=1, num_hidden_layers=4, hidden_size=HIDDEN, intermediate_size=64).save_pretrained(
        root / EXTRA, safe_serialization=True
    )
    yield root, model
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local(models):
    """The client's daemon: serves nothing at start."""
    root = Path(tempfile.mkdtemp(prefix="petal-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(models[0])}
    try:
        boot = s.make("s0", "--new-swarm", "--serve", MODEL, "--blocks", "0:10").start(extra_env=env)
        for name, blocks in (("s1", "10:20"), ("s2", "20:30")):
            s.make(name, "--initial-peer", boot.address, "--serve", MODEL, "--blocks", blocks).start(extra_env=env)
        yield s.make("c", "--initial-peer", boot.address).start(extra_env=env)
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(local) -> Client:
    return Client(local.socket, timeout=120)


def reference(model, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    with torch.no_grad():
        return Span.from_model(model, start, end)(hidden)


def test_forward_equals_local_blocks(client, models):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, HIDDEN)
    out = client.forward(MODEL, hidden, codec="none")
    assert out.shape == hidden.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(models[1], hidden, 0, 30), atol=ATOL, rtol=0)
    part = client.forward(MODEL, hidden, start=5, end=17, codec="none", mask=torch.ones(2, 7, dtype=torch.long))
    torch.testing.assert_close(part, reference(models[1], hidden, 5, 17), atol=ATOL, rtol=0)


@pytest.mark.parametrize(("start", "end"), [(0, 30), (5, 17)])
def test_backward_equals_autograd(client, models, start, end):
    torch.manual_seed(1)
    hidden = torch.randn(1, 6, HIDDEN, requires_grad=True)
    grad_out = torch.randn(1, 6, HIDDEN)
    span = Span.from_model(models[1], start, end)
    (want,) = torch.autograd.grad(span(hidden), hidden, grad_out)
    grad, grad_prompts, grad_lora = client.backward(MODEL, hidden, grad_out, start=start, end=end, codec="none")
    assert grad_prompts is None and grad_lora is None
    torch.testing.assert_close(grad, want, atol=ATOL, rtol=1e-4)


def test_backward_with_prompts_returns_their_gradient(client):
    prompts = torch.randn(12, 1, 2, HIDDEN) * 0.1
    grad, grad_prompts, _ = client.backward(
        MODEL, torch.randn(1, 5, HIDDEN), torch.randn(1, 5, HIDDEN), prompts=prompts, start=5, end=17, codec="none"
    )
    assert grad.shape == (1, 5, HIDDEN) and grad_prompts is not None and grad_prompts.shape == prompts.shape
    assert bool((grad_prompts.abs().sum(dim=(1, 2, 3)) > 0).all())  # every block's prompt gets a gradient


@pytest.mark.parametrize(("start", "end"), [(0, None), (5, 17)])
def test_session_steps_equal_the_full_forward(client, models, start, end):
    torch.manual_seed(2)
    hidden = torch.randn(1, 8, HIDDEN)
    want = reference(models[1], hidden, start, end or 30)
    with client.open_session(MODEL, max_length=8, start=start, end=end, codec="none") as s:
        assert (s.start, s.end) == (start, end or 30)
        assert s.route[0]["start"] == start and s.route[-1]["end"] == (end or 30)
        assert all(a["end"] == b["start"] for a, b in itertools.pairwise(s.route))
        outs = [s.step(hidden[:, :5])]
        assert s.position == 5
        for t in range(5, 8):
            outs.append(s.step(hidden[:, t : t + 1], mask=torch.ones(1, t + 1, dtype=torch.long)))
        assert s.position == 8
        torch.testing.assert_close(torch.cat(outs, dim=1), want, atol=ATOL, rtol=0)
        with pytest.raises(DaemonError) as e:
            s.step(hidden[:, :1])
        assert (e.value.status, e.value.code) == (400, "max_length")
    with pytest.raises(DaemonError) as e:
        s.client.request_msgpack("POST", f"/v1/sessions/{s.id}/step", {"hidden": encode_tensor(hidden[:, :1])})
    assert (e.value.status, e.value.code) == (404, "not_found")


async def test_async_client_forward_and_session(local, client, models):
    torch.manual_seed(3)
    hidden = torch.randn(1, 4, HIDDEN)
    async with AsyncClient(local.socket, timeout=120) as ac:
        assert (await ac.status())["peer_id"] == client.status()["peer_id"]
        out = await ac.forward(MODEL, hidden, start=3, end=25, codec="none")
        torch.testing.assert_close(out, reference(models[1], hidden, 3, 25), atol=ATOL, rtol=0)
        grad, _, _ = await ac.backward(MODEL, hidden, torch.ones_like(hidden), start=3, end=25, codec="none")
        assert grad.shape == hidden.shape
        async with await ac.open_session(MODEL, 4, codec="none") as s:
            steps = torch.cat([await s.step(hidden[:, :2]), await s.step(hidden[:, 2:])], dim=1)
        torch.testing.assert_close(steps, reference(models[1], hidden, 0, 30), atol=ATOL, rtol=0)
        with pytest.raises(DaemonError) as e:
            await ac.forward(MODEL, torch.randn(1, 2, HIDDEN + 1))
        assert e.value.code == "wrong_shape"


def raw(socket_path: Path, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("localhost", timeout=60)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(socket_path))
    try:
        conn.putrequest(method, path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        r = conn.getresponse()
        assert (r.getheader("Content-Type") or "").startswith("application/json")
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_bad_inputs_get_json_errors_and_the_daemon_keeps_serving(local, client):
    mp = {"Content-Type": "application/x-msgpack"}
    for body, status, code in [
        (b"\xc1\xc1garbage", 400, "bad_request"),
        (msgpack.packb([1, 2]), 400, "bad_request"),
        (msgpack.packb({"model": MODEL}), 400, "bad_request"),
        (
            msgpack.packb(
                {
                    "model": MODEL,
                    "hidden": {"dtype": "float32", "shape": [1, 2, HIDDEN], "codec": "none", "data": b"\0" * 7},
                }
            ),
            400,
            "bad_tensor",
        ),
        (
            msgpack.packb(
                {
                    "model": MODEL,
                    "hidden": encode_tensor(torch.zeros(1, 2, HIDDEN)),
                    "mask": encode_tensor(torch.ones(1, 2)),
                }
            ),
            400,
            "bad_tensor",
        ),
        (msgpack.packb({"model": MODEL, "hidden": encode_tensor(torch.zeros(2, HIDDEN))}), 400, "wrong_shape"),
        (
            msgpack.packb({"model": MODEL, "hidden": encode_tensor(torch.zeros(1, 2, HIDDEN)), "end": 31}),
            400,
            "bad_request",
        ),
    ]:
        got = raw(local.socket, "POST", "/v1/forward", body, {**mp, "Content-Length": str(len(body))})
        assert (got[0], got[1]["error"]["code"]) == (status, code), got
    status, err = raw(
        local.socket,
        "POST",
        "/v1/forward",
        b'{"model": "x"}',
        {"Content-Type": "application/json", "Content-Length": "14"},
    )
    assert status == 400 and "msgpack" in err["error"]["message"]
    # declared oversize: refused from the header, before the body is read (none is sent here)
    status, err = raw(local.socket, "POST", "/v1/forward", None, {**mp, "Content-Length": str(10**12)})
    assert (status, err["error"]["code"]) == (413, "too_large")
    for call, code in [
        (lambda: client.forward(MODEL, torch.randn(1, 3, HIDDEN + 4)), "wrong_shape"),
        (lambda: client.forward("no-such-model", torch.randn(1, 3, HIDDEN)), None),
        (lambda: client.backward(MODEL, torch.randn(1, 3, HIDDEN), torch.randn(1, 2, HIDDEN)), "wrong_shape"),
        (
            lambda: client.request_msgpack(
                "POST", "/v1/sessions/nope/step", {"hidden": encode_tensor(torch.ones(1, 1, HIDDEN))}
            ),
            "not_found",
        ),
        (lambda: client.request_msgpack("DELETE", "/v1/sessions/nope"), "not_found"),
        (lambda: client.open_session(MODEL, 0), "bad_request"),
    ]:
        with pytest.raises(DaemonError) as e:
            call()
        assert e.value.status is not None and 400 <= e.value.status < 600
        if code:
            assert e.value.code == code, e.value
    with client.open_session(MODEL, 4, codec="none") as s:  # a step with the wrong hidden size leaves it usable
        with pytest.raises(DaemonError) as e:
            s.step(torch.randn(1, 1, HIDDEN + 1))
        assert e.value.code == "wrong_shape"
        assert s.step(torch.randn(1, 2, HIDDEN)).shape == (1, 2, HIDDEN) and s.position == 2
    assert client.forward(MODEL, torch.randn(1, 2, HIDDEN), codec="none").shape == (1, 2, HIDDEN)


def test_sessions_over_json_and_models_path(client, models):
    info = client.request("POST", "/v1/sessions", {"model": MODEL, "max_length": 4, "start": 10, "end": 20})
    assert (info["start"], info["end"], info["max_length"]) == (10, 20, 4) and info["session"]
    assert client.request("DELETE", f"/v1/sessions/{info['session']}") == {"closed": True}
    [m] = [m for m in client.get("/v1/models")["data"] if m["id"] == MODEL]
    assert Path(m["path"]) == (models[0] / MODEL).resolve()


def test_serve_and_unserve_at_runtime(local, client):
    events = list(client.serve(EXTRA, blocks="1:4"))
    assert events[0]["event"] == "resolved" and (events[0]["start"], events[0]["end"]) == (1, 4)
    assert [e["block"] for e in events if e["event"] == "loading"] == [1, 2, 3]
    assert events[-1]["event"] == "serving" and events[-1]["throughput"] > 0
    me = client.status()["peer_id"]
    servers = client.get(f"/v1/swarm?model={EXTRA}")["models"][0]["servers"]
    assert [(s["peer_id"], s["start"], s["end"], s["state"]) for s in servers] == [(me, 1, 4, "online")]
    with pytest.raises(DaemonError) as e:  # all of EXTRA overlaps the span served: spans of one model are disjoint
        list(client.stream("POST", "/v1/serve", {"model": EXTRA}))
    assert (e.value.status, e.value.code) == (409, "conflict")
    assert "overlap" in e.value.message and "unserve" in e.value.message
    assert client.unserve(EXTRA) == {"model": EXTRA, "stopped": [{"start": 1, "end": 4}]}
    # its blocks' entries turn offline, and with no server left the model leaves the swarm's list
    for b in (1, 2, 3):
        entries = client.get(f"/v1/dht/{EXTRA}.{b}")["entries"]
        assert [(e["peer_id"], e["state"]) for e in entries] == [(me, "offline")]
    assert EXTRA not in [m["id"] for m in client.get("/v1/models")["data"]]
    with pytest.raises(DaemonError) as e:
        client.get(f"/v1/swarm?model={EXTRA}")
    assert e.value.code == "not_found"
    with pytest.raises(DaemonError) as e:
        client.unserve(EXTRA)
    assert (e.value.status, e.value.code) == (404, "not_found")
    for body, status in [
        ({"model": "no-such-model"}, 404),
        ({"model": EXTRA, "blocks": "3:9"}, 400),
        ({"model": EXTRA, "blocks": "0:2", "num_blocks": 2}, 400),
    ]:
        with pytest.raises(DaemonError) as e:
            list(client.stream("POST", "/v1/serve", body))
        assert e.value.status == status, e.value
    # after unserve the daemon can serve again (the whole model this time)
    events = list(client.serve(EXTRA))
    assert (events[-1]["event"], events[-1]["start"], events[-1]["end"]) == ("serving", 0, 4)
    assert client.unserve(EXTRA)["stopped"] == [{"start": 0, "end": 4}]
    assert "Traceback" not in local.log()


def test_docs_describe_the_new_endpoints(client):
    """docs/api.yaml's schemas accept what the daemon really sends (msgpack replies are checked decoded)."""
    import jsonschema
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "docs" / "api.yaml").read_text())

    def check(template: str, method: str, status: int, ctype: str, obj: object, request: object = None) -> None:
        op = spec["paths"][template][method]
        if request is not None:
            content = op["requestBody"]["content"]
            schema = (content.get("application/x-msgpack") or content["application/json"])["schema"]
            jsonschema.validate(request, {**schema, "components": spec["components"]})
        response = op["responses"][str(status)]
        if "$ref" in response:
            response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        jsonschema.validate(obj, {**response["content"][ctype]["schema"], "components": spec["components"]})

    hidden = encode_tensor(torch.randn(1, 3, HIDDEN))
    mp = "application/x-msgpack"
    fwd = {"model": MODEL, "hidden": hidden, "start": 2, "end": 12, "codec": "none"}
    check("/v1/forward", "post", 200, mp, client.request_msgpack("POST", "/v1/forward", fwd), fwd)
    bwd = {**fwd, "grad": hidden}
    check("/v1/backward", "post", 200, mp, client.request_msgpack("POST", "/v1/backward", bwd), bwd)
    opened = {"model": MODEL, "max_length": 4}
    info = client.request_msgpack("POST", "/v1/sessions", opened)
    check("/v1/sessions", "post", 200, mp, info, opened)
    step = {"hidden": hidden}
    check(
        "/v1/sessions/{id}/step",
        "post",
        200,
        mp,
        client.request_msgpack("POST", f"/v1/sessions/{info['session']}/step", step),
        step,
    )
    check(
        "/v1/sessions/{id}",
        "delete",
        200,
        "application/json",
        client.request("DELETE", f"/v1/sessions/{info['session']}"),
    )
    try:
        client.request_msgpack("POST", f"/v1/sessions/{info['session']}/step", step)
    except DaemonError as e:
        check(
            "/v1/sessions/{id}/step", "post", 404, "application/json", {"error": {"code": e.code, "message": e.message}}
        )
    serve = {"model": EXTRA, "blocks": "0:2"}
    for event in client.stream("POST", "/v1/serve", serve):
        check("/v1/serve", "post", 200, "application/x-ndjson", event, serve)
    check("/v1/unserve", "post", 200, "application/json", client.unserve(EXTRA), {"model": EXTRA})
    check("/v1/models", "get", 200, "application/json", client.get("/v1/models"))


def test_lora_over_the_socket_equals_local_hooks(client, models):
    """Client-owned LoRA on blocks 4 and 12 (two servers): outputs and grads w.r.t. input, A and B match autograd."""
    from petal.protocol.lora import Lora

    torch.manual_seed(4)
    r, scale = 2, 0.5
    weights = {}
    for b, path, (out_f, in_f) in ((4, "self_attn.q_proj", (HIDDEN, HIDDEN)), (12, "mlp.down_proj", (HIDDEN, 64))):
        weights[f"{b}.{path}.lora_A"] = (torch.randn(r, in_f) * 0.1).requires_grad_(True)
        weights[f"{b}.{path}.lora_B"] = (torch.randn(out_f, r) * 0.1).requires_grad_(True)
    lora = Lora(scale, weights)
    hidden = torch.randn(1, 5, HIDDEN, requires_grad=True)
    grad_out = torch.randn(1, 5, HIDDEN)

    layers = models[1].model.layers
    hooks = []
    for b, path in ((4, "self_attn.q_proj"), (12, "mlp.down_proj")):
        a, bb = weights[f"{b}.{path}.lora_A"], weights[f"{b}.{path}.lora_B"]
        hooks.append(
            layers[b]
            .get_submodule(path)
            .register_forward_hook(lambda m, inp, out, a=a, bb=bb: out + scale * (inp[0] @ a.T) @ bb.T)
        )
    try:
        want = Span.from_model(models[1], 2, 20)(hidden)
        grads = torch.autograd.grad(want, [hidden, *weights.values()], grad_out)
    finally:
        for h in hooks:
            h.remove()
    out = client.forward(MODEL, hidden, start=2, end=20, codec="none", lora=lora)
    torch.testing.assert_close(out, want.detach(), atol=ATOL, rtol=0)
    grad, _, grad_lora = client.backward(MODEL, hidden, grad_out, start=2, end=20, codec="none", lora=lora)
    torch.testing.assert_close(grad, grads[0], atol=ATOL, rtol=1e-4)
    assert grad_lora is not None and set(grad_lora) == set(weights)
    for key, g in zip(weights, grads[1:], strict=True):
        torch.testing.assert_close(grad_lora[key], g, atol=ATOL, rtol=1e-4)
