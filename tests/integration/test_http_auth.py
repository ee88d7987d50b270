"""The control API over TCP (``petald --http``) against a real daemon: a token on every request, Host checked
against the configured address (DNS rebinding), no cross-origin or "simple" (text/plain, form) writes, and a
browser on another origin that cannot drive the daemon. The Unix socket keeps working without a token.

One daemon serves a tiny random 4-block Llama with SmolLM2's tokenizer (its models dir holds it, so it is also
the client side of generation).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from petal.ctl.cli import cli
from tests.support.browser import CHROMIUM, chromium_flags
from tests.support.daemons import Daemon, Swarm
from tests.support.tinymodels import tiny_llama

MODEL = "tiny-http"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(smollm2_dir, port):
    root = Path(tempfile.mkdtemp(prefix="petal-h-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    m = tiny_llama(num_hidden_layers=4, hidden_size=32, intermediate_size=64, vocab_size=49152)
    m.save_pretrained(root / "models" / MODEL, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, root / "models" / MODEL / name)
    s = Swarm(root)
    env = {"PETAL_MODELS_DIR": str(root / "models")}
    try:
        yield s.make("h0", "--new-swarm", "--serve", MODEL, "--http", f"127.0.0.1:{port}").start(extra_env=env)
    finally:
        s.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def token(daemon: Daemon) -> str:
    return daemon.client.get("/v1/http/token")["token"]


def call(
    port: int, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """One request over TCP; headers given as Host="..." or Authorization="..." (underscores become dashes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name.replace("_", "-"), value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def error_code(data: bytes) -> str:
    return json.loads(data)["error"]["code"]


def served_blocks(daemon: Daemon) -> list[dict]:
    return [s for m in daemon.client.get("/v1/swarm")["models"] for s in m["servers"] if m["model"] == MODEL]


def test_no_token_is_401_saying_how_to_get_one(daemon, port):
    status, headers, data = call(port, "GET", "/v1/status")
    assert status == 401 and headers["content-type"].startswith("application/json")
    assert error_code(data) == "unauthorized" and "petalctl token" in json.loads(data)["error"]["message"]
    for auth in ("Bearer wrong-token-0123456789", "Basic dXNlcjpwYXNz", "Bearer", ""):
        status, _, data = call(port, "GET", "/v1/status", Authorization=auth)
        assert status == 401 and error_code(data) == "unauthorized", auth


def test_token_file_is_private_and_petalctl_token_prints_it(daemon, port, token):
    path = daemon.state_dir / "http.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == token
    r = CliRunner().invoke(cli, ["--socket", str(daemon.socket), "token"])
    assert r.exit_code == 0, r.output
    assert f"token: {token}" in r.output
    assert f"http://127.0.0.1:{port}/?token={token}" in r.output
    r = CliRunner().invoke(cli, ["--socket", str(daemon.socket), "token", "--url"])
    assert r.output.strip() == f"http://127.0.0.1:{port}/?token={token}"


def test_bearer_token_is_200_and_the_socket_needs_none(daemon, port, token):
    status, _, data = call(port, "GET", "/v1/status", Authorization=f"Bearer {token}")
    assert status == 200 and json.loads(data)["peer_id"] == daemon.status()["peer_id"]
    status, _, data = call(port, "GET", "/v1/status", Authorization=f"bearer {token}")
    assert status == 200
    # the token is only served on the socket, even to a client that holds it
    status, _, data = call(port, "GET", "/v1/http/token", Authorization=f"Bearer {token}")
    assert status == 404 and b"Unix socket" in data


def test_login_url_sets_a_strict_httponly_cookie_and_drops_the_token_from_the_url(daemon, port, token):
    status, headers, _ = call(port, "GET", f"/?token={token}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    pair = cookie.split(";")[0]
    assert pair == f"petal_token_{port}={token}"
    status, _, data = call(port, "GET", "/v1/status", Cookie=pair)
    assert status == 200 and json.loads(data)["peer_id"]
    status, _, data = call(port, "GET", "/", Cookie=pair)
    assert status == 200 and b'id="petal-dashboard"' in data  # the dashboard page
    status, headers, data = call(port, "GET", "/?token=not-the-token")
    assert status == 401 and "set-cookie" not in headers and error_code(data) == "unauthorized"
    status, _, _ = call(port, "GET", "/v1/status", Cookie=f"petal_token_{port}=not-the-token")
    assert status == 401


def test_a_foreign_host_is_refused_even_with_the_token(daemon, port, token):
    auth = f"Bearer {token}"
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
        status, _, data = call(port, "GET", "/v1/status", Host=host, Authorization=auth)
        assert status == 421 and error_code(data) == "misdirected", host
    status, _, data = call(port, "GET", f"/?token={token}", Host=f"evil.example:{port}")
    assert status == 421  # no cookie for a rebound name either
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        status, _, _ = call(port, "GET", "/v1/status", Host=host, Authorization=auth)
        assert status == 200, host


def test_cross_origin_and_simple_writes_are_refused_and_change_nothing(daemon, port, token):
    auth = f"Bearer {token}"
    put = json.dumps({"value": {"x": 1}}).encode()
    for origin in ("http://evil.example", "null", f"http://localhost:{port + 1}"):
        status, _, data = call(
            port, "PUT", "/v1/dht/a2-origin", put, Authorization=auth, Origin=origin, Content_Type="application/json"
        )
        assert status == 403 and error_code(data) == "forbidden", origin
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, data = call(port, "PUT", "/v1/dht/a2-origin", put, Authorization=auth, Content_Type=content_type)
        assert status == 415 and error_code(data) == "unsupported_media_type", content_type
    status, _, data = call(port, "POST", "/v1/unserve", json.dumps({"model": MODEL}).encode(), Authorization=auth)
    assert status == 415  # no Content-Type at all
    assert daemon.client.get("/v1/dht/a2-origin")["entries"] == []
    assert served_blocks(daemon), "a refused unserve stopped the server"
    # the API's own origin (a page it serves) may write, with the token
    status, _, data = call(
        port,
        "PUT",
        "/v1/dht/a2-origin",
        put,
        Authorization=auth,
        Origin=f"http://127.0.0.1:{port}",
        Content_Type="application/json; charset=utf-8",
    )
    assert status == 200, data
    status, _, data = call(port, "DELETE", "/v1/dht/a2-origin", Authorization=auth)
    assert status == 200, data


def test_openai_client_with_the_token_as_api_key(daemon, port, token):
    import openai

    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key=token, timeout=120, max_retries=0)
    assert MODEL in [m.id for m in client.models.list().data]
    done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()


def logged_in(profile: Path, port: int) -> bool:
    """Whether the browser profile keeps the API's cookie (so the attack page's requests may carry it)."""
    db = profile / "Default" / "Cookies"
    if not db.exists():
        return False
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT host_key, name FROM cookies").fetchall()
    return ("127.0.0.1", f"petal_token_{port}") in rows


ATTACK_PAGE = """<!doctype html><html><body><pre id="log">started</pre>
<form id="f" method="POST" action="API/v1/unserve" enctype="text/plain" target="sink">
<input name='{"model": "MODEL", "x": "' value='"}'></form><iframe name="sink"></iframe>
<script>
const api = "API", log = (s) => { document.getElementById("log").textContent += "\\n" + s; };
async function attack() {
  const tries = [
    ["no-cors text/plain unserve", api + "/v1/unserve", {method: "POST", mode: "no-cors", credentials: "include",
      headers: {"Content-Type": "text/plain"}, body: JSON.stringify({model: "MODEL"})}],
    ["cors json dht put", api + "/v1/dht/a2-browser", {method: "PUT", credentials: "include",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({value: {x: 1}})}],
    ["cors json with a guessed token", api + "/v1/unserve", {method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer guess"},
      body: JSON.stringify({model: "MODEL"})}],
  ];
  for (const [name, url, init] of tries) {
    try { const r = await fetch(url, init); log(name + ": " + r.type + " " + r.status); }
    catch (e) { log(name + ": blocked " + e); }
  }
  document.getElementById("f").submit();
  setTimeout(() => log("done"), 1500);
}
attack();
</script></body></html>
"""


def test_a_page_of_another_origin_cannot_drive_the_daemon_from_a_browser(daemon, port, token, tmp_path):
    """Headless Chromium, logged in to the API by its login URL, opens a page served from another loopback origin
    that POSTs to the API every way a page can; the daemon still serves and no DHT key was written."""
    if not CHROMIUM.exists():
        pytest.skip("needs /usr/bin/chromium (Debian package `chromium`)")
    api = f"http://127.0.0.1:{port}"
    page = ATTACK_PAGE.replace("API", api).replace("MODEL", MODEL).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tmp_path / "chromium"
    flags = [*chromium_flags(profile), "--virtual-time-budget=10000", "--dump-dom"]
    try:
        env = {**os.environ, "HOME": str(tmp_path)}
        login = subprocess.run([*flags, f"{api}/?token={token}"], capture_output=True, text=True, timeout=120, env=env)
        assert 'id="petal-dashboard"' in login.stdout, login.stderr[-2000:]
        assert logged_in(profile, port), "the login URL left no cookie in the browser's profile"
        # another origin on the same site: the browser sends the SameSite=Strict cookie, the daemon must refuse
        other = f"http://127.0.0.1:{server.server_address[1]}/"
        out = subprocess.run([*flags, other], capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert "done" in out.stdout, f"the attack page did not run:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    assert served_blocks(daemon), f"a page of another origin unserved the model:\n{out.stdout[-2000:]}"
    assert daemon.client.get("/v1/dht/a2-browser")["entries"] == []
