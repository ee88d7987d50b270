"""Every way a real `petald` can fail to start: one line on stderr that says what is wrong and what to do, the
exit status of its class (petal.daemon.systemd.ExitCode, documented in docs/operations.md), no traceback unless
--log-level debug. Log lines may come before it; anything else on stderr (a bare library line, a traceback, a
second error) fails the test."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from petal.daemon.systemd import ExitCode
from tests.support.daemons import Swarm
from tests.support.tinymodels import tiny_llama

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
ERROR = "petald: error: "
UNREACHABLE_PEER = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"  # a valid peer id nobody runs


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="petal-se-", dir="/tmp"))  # short: AF_UNIX paths are limited
    tiny_llama().save_pretrained(root / "tiny")
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text("{not json")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def held() -> Iterator[dict[str, int]]:
    """Ports on 127.0.0.1 this test holds while petald tries them: "tcp" listening, "udp" bound (answering nothing),
    "closed" bound but not listening (a connection to it is refused); and "free", one nobody holds."""
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as closed:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        closed.bind(("127.0.0.1", 0))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        ports = {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1], "closed": closed.getsockname()[1]}
        yield {**ports, "free": free}


def petald(tmp: Path, *args: str, defaults: bool = True) -> tuple[int, str]:
    """Run petald to its exit; return (exit status, its one error line) after checking stderr has nothing else."""
    base = ["--state-dir", str(tmp / "state"), "--socket", str(tmp / "p.sock"), "--listen", "/ip4/127.0.0.1/tcp/0"]
    cmd = [sys.executable, "-m", "petal.daemon", *(base if defaults else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "NOTIFY_SOCKET": ""})
    lines = r.stderr.splitlines()
    errors = [line for line in lines if line.startswith(ERROR)]
    stray = [line for line in lines if not line.startswith(ERROR) and not LOG_LINE.match(line)]
    assert "Traceback" not in r.stderr and not stray, r.stderr
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    assert r.returncode != 0 and r.stdout == "", (r.returncode, r.stdout)
    return r.returncode, errors[0].removeprefix(ERROR)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# each case: petald's arguments (built from the test's tmp dir and held ports), the exit status, words in the line
CASES = {
    # 2: usage
    "no swarm to join": (lambda t, p: [], ExitCode.USAGE, ["--initial-peer", "--new-swarm"]),
    "flag of the wrong type": (lambda t, p: ["--new-swarm", "--dht-port", "abc"], ExitCode.USAGE, ["--dht-port"]),
    "unknown flag": (lambda t, p: ["--new-swarm", "--no-such-flag"], ExitCode.USAGE, ["--no-such-flag", "--help"]),
    "config file missing": (
        lambda t, p: ["--config", str(t / "nothing.toml")],
        ExitCode.USAGE,
        ["nothing.toml", "does not exist"],
    ),
    "config file not TOML": (
        lambda t, p: ["--config", write(t / "c.toml", "new_swarm = \n")],
        ExitCode.USAGE,
        ["not valid TOML"],
    ),
    "config file a directory": (lambda t, p: ["--config", str(t)], ExitCode.USAGE, ["--config", "is a directory"]),
    "config file not text": (
        lambda t, p: ["--config", write_bytes(t / "c.toml", b"\xff\xfe\x00")],
        ExitCode.USAGE,
        ["cannot read config file"],
    ),
    "config setting unknown": (
        lambda t, p: ["--config", write(t / "c.toml", "listne = 3\n")],
        ExitCode.USAGE,
        ["unknown setting 'listne'"],
    ),
    "config setting of the wrong type": (
        lambda t, p: ["--config", write(t / "c.toml", "new_swarm = true\nlisten = 5\n")],
        ExitCode.USAGE,
        ["listen = 5", "list of strings"],
    ),
    "bad --blocks": (
        lambda t, p: ["--new-swarm", "--serve", "tiny", "--blocks", "3:1"],
        ExitCode.USAGE,
        ["--blocks '3:1'", "START < END"],
    ),
    "--initial-peer not an address": (
        lambda t, p: ["--initial-peer", "garbage"],
        ExitCode.USAGE,
        ["--initial-peer", "garbage"],
    ),
    "--initial-peer without peer id": (
        lambda t, p: ["--initial-peer", "/ip4/127.0.0.1/tcp/1"],
        ExitCode.USAGE,
        ["lacks /p2p/PEER_ID"],
    ),
    "--listen not an address": (
        lambda t, p: ["--new-swarm", "--listen", "/ip4/999.1.1.1/tcp/0"],
        ExitCode.USAGE,
        ["--listen", "999.1.1.1"],
    ),
    "--listen on an address not of this machine": (
        lambda t, p: ["--new-swarm", "--listen", "/ip4/192.0.2.1/tcp/0"],  # TEST-NET-1
        ExitCode.USAGE,
        ["192.0.2.1", "not one of this machine's"],
    ),
    # 3: in use
    "--listen port in use": (  # the second of two --listen addresses: libp2p alone would start on the first
        lambda t, p: ["--new-swarm", "--listen", f"/ip4/127.0.0.1/tcp/{p['tcp']}"],
        ExitCode.IN_USE,
        ["TCP port", "in use", "--listen"],
    ),
    "--dht-port in use": (
        lambda t, p: ["--new-swarm", "--dht-port", str(p["udp"])],
        ExitCode.IN_USE,
        ["UDP port", "in use", "--dht-port"],
    ),
    "--http port in use": (
        lambda t, p: ["--new-swarm", "--http", f"127.0.0.1:{p['tcp']}"],
        ExitCode.IN_USE,
        ["--http", "in use"],
    ),
    # 4: state and permissions
    "state dir is a file": (
        lambda t, p: ["--new-swarm", "--state-dir", write(t / "afile", "")],
        ExitCode.STATE,
        ["state dir", "--state-dir"],
    ),
    "identity key is not a key": (
        lambda t, p: ["--new-swarm", "--state-dir", str(t / "k")],
        ExitCode.STATE,
        ["identity.key", "move it away"],
    ),
    "identity key is a directory": (
        lambda t, p: ["--new-swarm", "--state-dir", str(t / "d")],
        ExitCode.STATE,
        ["state dir", "identity.key"],
    ),
    "HTTP token readable by others": (
        lambda t, p: ["--new-swarm", "--state-dir", str(t / "tok"), "--http", f"127.0.0.1:{p['free']}"],
        ExitCode.STATE,
        ["http.token"],
    ),
    "socket dir writable by others": (
        lambda t, p: ["--new-swarm", "--socket", str(t / "open" / "p.sock")],
        ExitCode.STATE,
        ["writable by others", "chmod go-w"],
    ),
    # 5: the model to serve
    "unknown model": (
        lambda t, p: ["--new-swarm", "--serve", "no-such-model"],
        ExitCode.MODEL,
        ["no-such-model", "petald pull"],
    ),
    "model dir with invalid config.json": (
        lambda t, p: ["--new-swarm", "--serve", str(t.parent / "badjson")],
        ExitCode.MODEL,
        ["badjson"],
    ),
    "--blocks outside the model": (
        lambda t, p: ["--new-swarm", "--serve", str(t.parent / "tiny"), "--blocks", "0:99"],
        ExitCode.MODEL,
        ["--blocks '0:99'", "END <= 6"],
    ),
    # 6: network
    "initial peer unreachable": (
        lambda t, p: ["--initial-peer", f"/ip4/127.0.0.1/tcp/{p['closed']}/p2p/{UNREACHABLE_PEER}"],
        ExitCode.NETWORK,
        ["none of the initial peers answered", "running"],
    ),
    "no DHT peer answers": (
        lambda t, p: ["--initial-peer", f"/ip4/127.0.0.1/udp/{p['udp']}"],
        ExitCode.NETWORK,
        ["joined no DHT peers", "UDP"],
    ),
}


def prepare(case: str, tmp: Path) -> None:
    """The state a case needs on disk before petald starts."""
    if case == "identity key is not a key":
        (tmp / "k").mkdir()
        (tmp / "k" / "identity.key").write_bytes(b"short")
    elif case == "identity key is a directory":
        (tmp / "d" / "identity.key").mkdir(parents=True)
    elif case == "HTTP token readable by others":
        (tmp / "tok").mkdir()
        (tmp / "tok" / "http.token").write_text("x" * 43 + "\n")
        os.chmod(tmp / "tok" / "http.token", 0o644)
    elif case == "socket dir writable by others":
        (tmp / "open").mkdir()
        os.chmod(tmp / "open", 0o777)


@pytest.mark.parametrize("case", list(CASES))
def test_start_up_error_is_one_line_with_its_exit_status(case, root, held):
    make_args, code, words = CASES[case]
    tmp = root / re.sub(r"\W+", "-", case)
    tmp.mkdir()
    prepare(case, tmp)
    status, line = petald(tmp, *make_args(tmp, held))
    assert status == code, (status, line)
    for word in words:
        assert word in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_without_cuda_is_a_model_error(root):
    status, line = petald(root, "--new-swarm", "--serve", str(root / "tiny"), "--device", "cuda")
    assert status == ExitCode.MODEL and "--device cpu" in line


def test_control_socket_of_a_running_daemon_is_in_use(root):
    swarm = Swarm(root / "running")
    try:
        daemon = swarm.start_bootstrap("r")
        status, line = petald(root / "running", "--new-swarm", "--socket", str(daemon.socket))
        assert status == ExitCode.IN_USE and "another petald already listens" in line and "--socket" in line
        assert daemon.status()["peer_id"]  # the running daemon was left alone
    finally:
        swarm.close()


def test_debug_log_level_shows_the_traceback(root, held):
    args = ["--new-swarm", "--listen", f"/ip4/127.0.0.1/tcp/{held['tcp']}", "--log-level", "debug"]
    cmd = [sys.executable, "-m", "petal.daemon", "--state-dir", str(root / "dbg"), "--socket", str(root / "d.sock")]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == ExitCode.IN_USE
    assert "Traceback" in r.stderr and r.stderr.splitlines()[-1].startswith(ERROR)
