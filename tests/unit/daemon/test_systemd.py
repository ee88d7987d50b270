"""The systemd unit: verified by systemd-analyze where available, and the settings the design asks for are there."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from petal.daemon.config import load_config

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
