"""The systemd unit: verified by systemd-analyze where available, and the settings the design asks for are there;
the watchdog period, sd_notify's robustness, and the documented exit statuses."""

import configparser
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from petal.daemon.config import load_config
from petal.daemon.main import cli
from petal.daemon.systemd import EXIT_CODE_HELP, ExitCode, sd_notify, watchdog_period

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "petald.service"
EXAMPLE = UNIT.with_name("petald.toml")


def unit() -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read(UNIT)
    return p


def test_unit_has_notify_user_dirs_and_hardening():
    s = unit()["Service"]
    assert s["Type"] == "notify" and s["User"] == "petal" and s["Restart"] == "on-failure"
    assert s["StateDirectory"] == "petal" and s["RuntimeDirectory"] == "petal"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert s[key] == value, key
    assert "--config /etc/petal/petald.toml" in s["ExecStart"]


def test_example_config_loads():
    c = load_config(EXAMPLE, {})
    assert c.new_swarm and c.listen == ["/ip4/0.0.0.0/tcp/31330"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    petald = Path(sys.executable).with_name("petald")
    (tmp_path / "petald.service").write_text(UNIT.read_text().replace("/usr/local/bin/petald", str(petald)))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "petald.service")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_unit_has_watchdog_and_does_not_restart_what_needs_a_person():
    s = unit()["Service"]
    assert s["WatchdogSec"] == "60s"
    assert {int(c) for c in s["RestartPreventExitStatus"].split()} == {ExitCode.USAGE, ExitCode.STATE, ExitCode.MODEL}


def test_exit_codes_are_documented_in_the_guide_and_in_help():
    """Every ExitCode has a row in docs/operations.md's table and a line in `petald --help`, and nothing else does."""
    doc = (UNIT.parents[1] / "docs" / "operations.md").read_text()
    table = doc[doc.index("## When petald does not start") :]
    rows = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert rows == {int(c) for c in ExitCode}
    help_text = CliRunner().invoke(cli, ["--help"]).output
    listed = {int(m) for m in re.findall(r"^ +(\d) +\S", help_text[help_text.index("Exit status") :], re.M)}
    assert listed == {int(c) for c in ExitCode} and set(EXIT_CODE_HELP) == set(ExitCode)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # WatchdogSec=30s: ping every 15 s
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_period(monkeypatch, tmp_path, env, expected):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(pid=os.getpid()))
    assert watchdog_period() == expected
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert watchdog_period() is None  # nobody to ping


def test_sd_notify_neither_raises_nor_blocks_when_nobody_reads(tmp_path, monkeypatch):
    """A notify socket that is gone, or whose reader stopped reading (its queue full), must not stop the daemon's
    event loop: sd_notify reports False instead of raising or blocking."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("WATCHDOG=1") is False
    path = tmp_path / "full"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as reader:
        reader.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        results: list[bool] = []
        sender = threading.Thread(target=lambda: results.extend(sd_notify("WATCHDOG=1") for _ in range(2000)))
        sender.start()
        sender.join(timeout=60)
        assert not sender.is_alive(), "sd_notify blocked on a full notify socket"
        assert results[0] is True and results[-1] is False  # the queue filled up; later pings were dropped
        assert reader.recv(100) == b"WATCHDOG=1"
