"""How the control API reads user strings: strict JSON (no NaN, no lone surrogates) and model names that become
paths (issue #16 findings 2 and 3): every bad input is a PetalError with a 4xx code, never an OSError or
RuntimeError from the file system."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from petal.daemon.api.bodies import parse_json
from petal.daemon.api.errors import STATUS_OF_CODE, JsonErrorRunner, code_of_status
from petal.daemon.api.frontend import ModelFrontend, resolve_model
from petal.kernels.store import ModelStoreError, open_model
from petal.protocol.errors import PetalError
from tests.support.rawhttp import Reply, raw


def code_of(call, *args) -> str:
    with pytest.raises(PetalError) as info:
        call(*args)
    assert STATUS_OF_CODE[info.value.code] < 500
    return info.value.code


@pytest.mark.parametrize(
    "text",
    ["NaN", '{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": 1e999}', '["\\ud800"]', '{"\\udc00": 1}'],
)
def test_json_that_python_would_accept_but_nothing_downstream_can_use_is_a_400(text):
    assert code_of(parse_json, text) == "bad_request"


def test_valid_json_with_surrogate_pairs_is_fine():
    assert parse_json('{"a": "\\ud83d\\ude00", "b": 1.5e300, "c": [1, {"d": null}]}') == {
        "a": "\U0001f600",
        "b": 1.5e300,
        "c": [1, {"d": None}],
    }


def test_deep_json_is_a_400_not_a_recursion_error():
    assert code_of(parse_json, "[" * 100_000) == "bad_request"


def test_http_statuses_map_to_error_codes():
    assert code_of_status(413) == "too_large"
    assert code_of_status(404) == "not_found"
    assert code_of_status(400) == "bad_request"
    assert code_of_status(500) == "internal"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    for name, config in (("badjson", "{nope"), ("badtype", '{"model_type": "nosuch"}'), ("listcfg", "[1]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("a" * 300, "bad_request"),
        ("x/" + "b" * 256, "bad_request"),
        ("/" + "c/" * 3000, "bad_request"),
        ("nul\0", "bad_request"),
        ("\ud800", "bad_request"),
        ("", "bad_request"),
        ("~nosuchuser", "not_found"),
        ("~nosuchuser/m", "not_found"),
        ("..", "not_found"),
        (".", "not_found"),
        ("badjson/..", "not_found"),
        ("/", "not_found"),
        ("nosuch", "not_found"),
    ],
)
def test_a_name_that_is_no_model_is_a_4xx(models: Path, name: str, code: str):
    assert code_of(resolve_model, name, models) == code


def test_a_pulled_model_and_a_model_dir_resolve(models: Path):
    assert resolve_model("badjson", models) == models / "badjson"
    assert resolve_model(str(models / "badtype"), models) == models / "badtype"


@pytest.mark.parametrize("name", ["badjson", "badtype", "listcfg"])
def test_a_broken_model_dir_is_a_model_store_error(models: Path, name: str):
    with pytest.raises(ModelStoreError, match="not a usable model dir"):
        open_model(models / name)
    assert code_of(ModelFrontend, models / name) == "not_found"


def test_a_path_the_os_refuses_is_a_model_store_error():
    for path in ("~nosuchuser/x", "/tmp/" + "a" * 300, "/tmp/nul\0"):
        with pytest.raises(ModelStoreError):
            open_model(path)


def test_the_runner_answers_http_parser_errors_in_json(tmp_path: Path):
    """Without JsonErrorRunner aiohttp answers these in text/plain, outside every middleware."""
    path = tmp_path / "s.sock"

    async def main() -> list[Reply]:
        app = web.Application()
        app.router.add_get("/ok", lambda _: web.json_response({"ok": True}))
        runner = JsonErrorRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
        try:
            sent = [b"GARBAGE\r\n\r\n", b"GET /ok HTTP/1.1\r\nHost x\r\n\r\n", b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"]
            return [await asyncio.to_thread(raw, path, data, 10.0, 2.0) for data in sent]
        finally:
            await runner.cleanup()

    garbage, bad_header, ok = asyncio.run(main())
    for reply in (garbage, bad_header):
        assert reply.status == 400 and reply.content_type.startswith("application/json"), reply
        assert reply.error is not None and reply.error["code"] == "bad_request"
        assert reply.error["message"].startswith("malformed HTTP request")
    assert ok.status == 200
