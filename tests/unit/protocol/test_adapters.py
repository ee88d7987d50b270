"""Server-hosted adapters and several models per daemon on the wire: adapter names, the server record's ``ad`` field,
one models entry listing several models, ``MODEL:ADAPTER``, and petald's ``--serve MODEL:A:B`` / ``--adapter``."""

from __future__ import annotations

import pytest

from petal.daemon.config import ConfigError, load_config, split_serve
from petal.protocol.adapters import body_adapter, request_adapter, split_model_adapter
from petal.protocol.errors import PetalError, WireError
from petal.protocol.records import (
    MAX_MODELS_PER_ENTRY,
    ModelRecord,
    RecordError,
    ServerRecord,
    check_announcement,
    models_value,
    parse_models,
)

RECORD = ServerRecord(("/ip4/127.0.0.1/tcp/1",), 0, 4, "online", 1.0, 100, "float32", 1)


def test_server_record_lists_adapters_only_when_set() -> None:
    assert "ad" not in RECORD.to_value()
    with_ad = ServerRecord(**{**RECORD.__dict__, "adapters": ("sql", "chat-v2")})
    value = with_ad.to_value()
    assert value["ad"] == ["sql", "chat-v2"] and ServerRecord.from_value(value).adapters == ("sql", "chat-v2")
    check_announcement("m.0", {**value, "ad": [f"a{i:031d}"[:32] for i in range(8)]})  # the most fit one record
    for bad in (["../x"], ["a" * 33], "sql", [1], [f"a{i}" for i in range(9)]):
        assert ServerRecord.parse({**value, "ad": bad}) is None


def test_one_models_entry_lists_several_models_and_old_readers_see_the_first() -> None:
    records = [ModelRecord(f"org/model-{i}", "0123456789abcdef", 30, "llama") for i in range(MAX_MODELS_PER_ENTRY)]
    value = models_value(records)
    check_announcement("_models", value)  # fits a DHT record
    assert parse_models(value) == records
    assert ModelRecord.parse(value) == records[0]  # what a reader that knows one model per entry sees
    assert parse_models({**value, "o": ["junk", {"n": "x"}]}) == records[:1]  # malformed ones are skipped
    assert parse_models("junk") == []
    with pytest.raises(RecordError):
        models_value(records + records[:1])


def test_requests_name_hosted_adapters() -> None:
    assert request_adapter({}, {"a"}) is None
    assert request_adapter({"adapter": "a"}, {"a"}) == "a"
    with pytest.raises(PetalError, match="hosts: a") as e:
        request_adapter({"adapter": "b"}, {"a"})
    assert e.value.code == "not_found"
    with pytest.raises(WireError):
        request_adapter({"adapter": "../../etc"}, {"a"})
    assert split_model_adapter("smollm2:sql") == ("smollm2", "sql")
    assert split_model_adapter("ORG/Name") == ("ORG/Name", None)
    assert split_model_adapter("/models/x:") == ("/models/x:", None)
    assert body_adapter({"model": "m:a"}) == ("m", "a")
    assert body_adapter({"model": "m", "adapter": "b"}) == ("m", "b")
    with pytest.raises(PetalError, match="'adapter'") as e:
        body_adapter({"model": "m", "adapter": 3})
    assert e.value.code == "bad_request"


def test_serve_entries_and_adapters_from_the_cli_and_toml(tmp_path) -> None:
    assert split_serve("smollm2:0:10") == ("smollm2", "0:10")
    assert split_serve("./m.gguf") == ("./m.gguf", None)
    assert split_serve("c:/odd:path") == ("c:/odd:path", None)
    config = load_config(
        None,
        {
            "new_swarm": True,
            "serve": ("a:0:3", "a:3:6", "b"),
            "blocks": "1:2",
            "adapters": ("x=/ad/one", "/ad/two"),
        },
    )
    assert config.serve_specs() == [("a", "0:3"), ("a", "3:6"), ("b", "1:2")]
    assert [(n, str(p)) for n, p in config.adapter_dirs()] == [("x", "/ad/one"), ("two", "/ad/two")]
    toml = tmp_path / "petald.toml"
    toml.write_text('new_swarm = true\nserve = ["a:0:3", "b"]\nadapters = "x=/ad"\n')
    assert load_config(toml, {}).serve_specs() == [("a", "0:3"), ("b", None)]
    for bad, match in [
        ({"serve": ("a:3:1",)}, "START < END"),
        ({"serve": ("a",), "adapters": ("x=/1", "x=/2")}, "repeat"),
        ({"serve": ("a",), "adapters": ("bad name=/1",)}, "name"),
        ({"adapters": ("/1",)}, "needs --serve"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, {"new_swarm": True, **bad})
