"""The socket's directory (#12): created private, and refused when another user owns it or may write it, because
whoever can write the directory can replace the socket and answer in the daemon's name.

The tests run as root, so "another user" is a directory ``os.chown``-ed to an unused uid.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from petal.daemon.config import ConfigError, prepare_socket_dir

OTHER_UID = 54321


@pytest.fixture
def root():
    path = Path(tempfile.mkdtemp(prefix="petal-r-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_creates_a_private_dir(root, monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    os.umask(old := os.umask(0))  # read the umask back unchanged
    assert prepare_socket_dir(root / "petal-1000" / "petald.sock") == root / "petal-1000"
    want = 0o750 if os.geteuid() == 0 else 0o700  # a system daemon's group may use the socket
    assert stat.S_IMODE((root / "petal-1000").stat().st_mode) == want
    assert os.umask(old) == old
    prepare_socket_dir(root / "petal-1000" / "petald.sock")  # again: it is ours and private


def test_refuses_a_dir_another_user_owns(root):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    taken = root / "petal-1000"
    taken.mkdir(mode=0o700)
    os.chown(taken, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match=r"belongs to uid 54321.*pass --socket"):
        prepare_socket_dir(taken / "petald.sock")


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o702])
def test_refuses_a_dir_others_can_write(root, mode):
    loose = root / "petal-1000"
    loose.mkdir()
    os.chmod(loose, mode)
    with pytest.raises(ConfigError, match=r"writable by others.*chmod go-w"):
        prepare_socket_dir(loose / "petald.sock")


def test_refuses_a_symlink_even_to_a_good_dir(root):
    (root / "real").mkdir(mode=0o700)
    (root / "petal-1000").symlink_to(root / "real")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_socket_dir(root / "petal-1000" / "petald.sock")
    (root / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        prepare_socket_dir(root / "file" / "petald.sock")


def test_daemon_refuses_to_start_in_another_users_dir_with_one_line(root):
    """A real petald, told to put its socket in a dir that another user made: a failed start (the exit code of a
    state-dir problem), one line, no traceback, and the other user's socket file is left alone."""
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    taken = root / "petal-1000"
    taken.mkdir(mode=0o700)
    planted = taken / "petald.sock"
    planted.write_text("another user's socket")
    os.chown(taken, OTHER_UID, OTHER_UID)
    cmd = [sys.executable, "-m", "petal.daemon", "--new-swarm", "--state-dir", str(root / "state")]
    cmd += ["--socket", str(planted), "--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "info"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "NOTIFY_SOCKET": ""})
    assert out.returncode not in (0, 2), out.stdout + out.stderr  # 2 is a usage error: the flags were fine
    said = [line for line in (out.stdout + out.stderr).splitlines() if f"socket dir {taken} belongs" in line]
    assert len(said) == 1 and f"uid {OTHER_UID}" in said[0] and "pass --socket" in said[0], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert planted.read_text() == "another user's socket"
