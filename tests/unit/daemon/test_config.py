"""petald settings: defaults, TOML, flags, and errors that say what to do."""

from pathlib import Path

import pytest

from petal.daemon.config import Config, ConfigError, default_socket, load_config
from petal.daemon.net.addrs import parse_multiaddr
from petal.daemon.systemd import sd_notify


def test_flags_override_file_which_overrides_defaults(tmp_path):
    f = tmp_path / "petald.toml"
    f.write_text('new-swarm = true\nlog_level = "debug"\nlisten = "/ip4/127.0.0.1/tcp/9"\nstate_dir = "~/x"\n')
    c = load_config(f, {"log_level": "warning", "initial_peers": ()})
    assert c.new_swarm and c.log_level == "warning" and c.listen == ["/ip4/127.0.0.1/tcp/9"]
    assert c.state_dir == Path.home() / "x"


def test_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="--initial-peer"):
        load_config(None, {})
    f = tmp_path / "bad.toml"
    f.write_text("new_swarm = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", {})


def test_systemd_directories_win(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/petal")
    assert default_socket() == Path("/run/petal/petald.sock")


def test_multiaddr_parsing():
    hp = parse_multiaddr("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc")
    assert (hp.host, hp.port, hp.transport, hp.peer_id) == ("127.0.0.1", 4001, "tcp", "12D3KooWabc")
    assert hp.multiaddr() == "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWabc"
    for bad in (
        "127.0.0.1:4001",
        "/ip4/1.2.3.4/tcp/x",
        "/ip4/1.2.3.4/quic/1",
        "/ip4/1.2.3.4/tcp/1/p2p",
        "/ip4/h/tcp/70000",
    ):
        with pytest.raises(ValueError):
            parse_multiaddr(bad)


def test_sd_notify_sends_to_notify_socket(tmp_path, monkeypatch):
    import socket

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_direct_plane_defaults_to_the_listen_host_and_the_next_port():
    base = dict(new_swarm=True)
    assert Config(**base).direct_listen() == "0.0.0.0:31331"
    assert Config(listen=["/ip4/127.0.0.1/tcp/0"], **base).direct_listen() == "127.0.0.1:0"
    assert Config(listen=["/ip6/::1/tcp/4001"], **base).direct_listen() == "[::1]:4002"
    assert Config(direct="off", **base).direct_listen() is None
    assert Config(direct="10.0.0.1:9000", **base).direct_listen() == "10.0.0.1:9000"
    with pytest.raises(ConfigError, match="auto or off"):
        Config(direct="nonsense", **base).validate()
