"""petalctl's side of #12: a socket in ``/tmp/petal-$UID`` that another user made is never connected to, even when
something listens on it (that user answering in the daemon's name). ``SHARED_TMP`` points at a test dir."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from petal.ctl import client as client_module
from petal.ctl.cli import cli
from petal.ctl.client import AsyncClient, Client, DaemonError

OTHER_UID = 54321


@pytest.fixture
def shared_tmp(monkeypatch):
    path = Path(tempfile.mkdtemp(prefix="petal-t-", dir="/tmp"))  # short: AF_UNIX paths are limited to 108 bytes
    monkeypatch.setattr(client_module, "SHARED_TMP", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def impostor(directory: Path) -> socket.socket:
    """Something listening on the daemon's socket path, as another user could leave there."""
    directory.mkdir(mode=0o700, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(directory / "petald.sock"))
    server.listen(8)
    server.setblocking(False)
    return server


def accepted(server: socket.socket) -> int:
    n = 0
    while True:
        try:
            conn, _ = server.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_a_dir_of_another_user_is_refused_before_connecting(shared_tmp):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    directory = shared_tmp / f"petal-{os.getuid()}"
    server = impostor(directory)
    os.chown(directory, OTHER_UID, OTHER_UID)
    sock = str(directory / "petald.sock")
    try:
        with pytest.raises(DaemonError, match="not a private directory") as e:
            Client(sock).status()
        assert e.value.code == "unavailable"
        r = CliRunner().invoke(cli, ["--socket", sock, "status"])
        assert r.exit_code == 2 and "not a private directory" in r.output and "rm -r" in r.output
        assert accepted(server) == 0, "petalctl connected to another user's socket"
    finally:
        server.close()


async def test_async_client_refuses_too(shared_tmp):
    directory = shared_tmp / f"petal-{os.getuid()}"
    server = impostor(directory)
    os.chmod(directory, 0o777)
    try:
        async with AsyncClient(directory / "petald.sock") as c:
            with pytest.raises(DaemonError, match="not a private directory"):
                await c.status()
        assert accepted(server) == 0
    finally:
        server.close()


def test_a_private_dir_of_ours_is_used(shared_tmp):
    directory = shared_tmp / f"petal-{os.getuid()}"
    directory.mkdir(mode=0o700)
    with pytest.raises(DaemonError, match="no petald listening"):
        Client(directory / "petald.sock").status()
