"""The TCP API's guard without a daemon (#11): --http parsing, which Host headers each bind accepts, and the token
file (created private once, refused when it is not a private file of this user)."""

from __future__ import annotations

import os
import socket

import pytest

from petal.daemon.api.auth import HttpGuard, TokenError, load_or_create_token
from petal.daemon.config import ConfigError, parse_http_address


@pytest.mark.parametrize(
    ("address", "want"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:9", ("::1", 9)), ("localhost:1", ("localhost", 1))],
)
def test_parse_http_address(address, want):
    assert parse_http_address(address) == want


@pytest.mark.parametrize("address", ["8080", ":8080", "127.0.0.1:", "127.0.0.1:x", "::1:8080", "h:0", "h:65536"])
def test_parse_http_address_refuses_with_an_example(address):
    with pytest.raises(ConfigError, match="--http"):
        parse_http_address(address)


def guard(host: str, port: int = 8080) -> HttpGuard:
    return HttpGuard(host, port, "t" * 43)


def test_loopback_bind_accepts_its_loopback_names_on_its_port_only():
    g = guard("127.0.0.1")
    for ok in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"):
        assert g.host_allowed(ok), ok
    bad = ("evil.example:8080", "127.0.0.1:8081", "127.0.0.1", "127.0.0.2:8080", "localhost.evil:8080", "", None)
    for no in (*bad, "127.0.0.1:08080x", "[::1:8080", "10.0.0.1:8080", f"{socket.gethostname()}:8080"):
        assert not g.host_allowed(no), no
    assert g.login_url == "http://127.0.0.1:8080/?token=" + "t" * 43


def test_specific_and_wildcard_binds():
    lan = guard("192.168.1.5")
    assert lan.host_allowed("192.168.1.5:8080") and not lan.host_allowed("localhost:8080")
    anywhere = guard("0.0.0.0")
    for ok in ("192.168.1.5:8080", "localhost:8080", "[fe80::1]:8080", f"{socket.gethostname()}:8080"):
        assert anywhere.host_allowed(ok), ok
    assert not anywhere.host_allowed("evil.example:8080")  # a name DNS could rebind
    assert anywhere.base_url == "http://127.0.0.1:8080"
    v6 = guard("::1")
    assert v6.host_allowed("[::1]:8080") and v6.host_allowed("localhost:8080") and v6.base_url == "http://[::1]:8080"
    assert guard("127.0.0.1", 80).host_allowed("localhost")  # the default port may go unwritten


def test_token_is_created_once_private(tmp_path):
    token = load_or_create_token(tmp_path)
    assert len(token) >= 32 and (tmp_path / "http.token").stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(tmp_path) == token


def test_token_file_that_others_can_read_or_a_symlink_is_refused(tmp_path):
    load_or_create_token(tmp_path)
    os.chmod(tmp_path / "http.token", 0o644)
    with pytest.raises(TokenError, match="remove it"):
        load_or_create_token(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "elsewhere").write_text("x" * 43)
    os.chmod(other / "elsewhere", 0o600)
    (other / "http.token").symlink_to(other / "elsewhere")
    with pytest.raises(TokenError, match="remove it"):
        load_or_create_token(other)
    (tmp_path / "short").mkdir()
    fd = os.open(tmp_path / "short" / "http.token", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"short")
    os.close(fd)
    with pytest.raises(TokenError, match="not a token"):
        load_or_create_token(tmp_path / "short")
