"""The socket API bodies petalctl builds are the ones petald parses, and every bad field is a 400 that names it."""

import pytest

from petal.protocol.errors import PetalError
from petal.protocol.socket_api import (
    MAX_MODEL_BYTES,
    MAX_PROMPT_BYTES,
    MODEL_HINT,
    RouteOptions,
    SamplingFields,
    ServeRequest,
    SessionRequest,
    UnserveRequest,
    check_prompt_size,
    error_body,
    error_fields,
    generate_body,
    model_field,
    openai_max_tokens_key,
)


def bad(call, *args, **kwargs) -> str:
    with pytest.raises(PetalError) as info:
        call(*args, **kwargs)
    assert info.value.code == "bad_request"
    return info.value.message


@pytest.mark.parametrize(
    "request_", [ServeRequest("m"), ServeRequest("m", blocks="0:4"), ServeRequest("m", num_blocks=3)]
)
def test_serve_request_round_trips(request_):
    assert ServeRequest.from_body(request_.to_body()) == request_


def test_serve_request_errors_name_the_field():
    assert bad(ServeRequest.from_body, {}) == MODEL_HINT
    assert "START:END" in bad(ServeRequest.from_body, {"model": "m", "blocks": 3})
    assert "not both" in bad(ServeRequest.from_body, {"model": "m", "blocks": "0:1", "num_blocks": 1})
    assert "'num_blocks' must be an integer >= 1" in bad(ServeRequest.from_body, {"model": "m", "num_blocks": 0})
    assert UnserveRequest.from_body(UnserveRequest("m").to_body()) == UnserveRequest("m")


def test_session_request():
    assert SessionRequest.from_body(SessionRequest("m", 8, 2).to_body()) == SessionRequest("m", 8, 2)
    assert SessionRequest.from_body({"model": "m", "max_length": 8}).batch == 1
    assert "is required" in bad(SessionRequest.from_body, {"model": "m"})
    assert "'batch' must be an integer >= 1" in bad(
        SessionRequest.from_body, {"model": "m", "max_length": 2, "batch": 0}
    )


def test_route_options():
    codecs = ("none", "q8")
    assert RouteOptions.from_body({}, codecs) == RouteOptions()
    opts = RouteOptions.from_body({"start": 2, "end": 5, "codec": "q8", "allowed": ["a"], "blocked": None}, codecs)
    assert opts == RouteOptions(2, 5, "q8", ["a"], None)
    assert bad(RouteOptions.from_body, {"codec": "zip"}, codecs) == "'codec' must be one of ['none', 'q8'], got 'zip'"
    assert "'start' must be an integer >= 0" in bad(RouteOptions.from_body, {"start": -1}, codecs)
    assert "'end' must be an integer >= 1" in bad(RouteOptions.from_body, {"end": True}, codecs)
    assert bad(RouteOptions.from_body, {"blocked": "a"}, codecs) == "'blocked' must be a list of peer ids"


def test_sampling_fields():
    assert SamplingFields.from_body({}) == SamplingFields()
    fields = SamplingFields.from_body({"max_tokens": 5, "temperature": 1, "stop": "x"}, max_tokens_key="max_tokens")
    assert (fields.max_new_tokens, fields.temperature, fields.stop) == (5, 1.0, ("x",))
    assert isinstance(fields.temperature, float)
    assert SamplingFields.from_body({}, temperature=1.0).temperature == 1.0
    assert bad(SamplingFields.from_body, {"seed": "1"}) == '"seed" must be an integer'
    assert bad(SamplingFields.from_body, {"stop": 3}) == '"stop" must be a string or a list of strings'
    assert bad(SamplingFields.from_body, {"top_k": 1.5}) == "'top_k' must be a int, got 1.5"
    assert openai_max_tokens_key({"max_tokens": 1}) == "max_tokens"
    assert openai_max_tokens_key({}) == "max_completion_tokens"


def test_generate_body_and_errors():
    assert generate_body("m", "hi", temperature=0.5) == {
        "model": "m",
        "stream": True,
        "prompt": "hi",
        "temperature": 0.5,
    }
    assert "prompt" not in generate_body("m", input_ids=[1])
    assert error_fields(error_body("busy", "later")) == ("busy", "later")
    assert error_fields({"error": "text"}) == ("error", None)
    assert error_fields([1]) == ("error", None)


def test_sampling_fields_must_be_finite_and_in_range():
    """Issue #16 finding 4: out-of-range numbers are a 400 naming the field, never an overflow later."""
    for body, says in [
        ({"seed": 2**64}, '"seed" must be in [0, 2**63)'),
        ({"seed": -1}, '"seed" must be in [0, 2**63)'),
        ({"temperature": float("nan")}, "'temperature' must be a finite number"),
        ({"temperature": float("inf")}, "'temperature' must be a finite number"),
        ({"top_p": float("nan")}, "'top_p' must be a finite number"),
        ({"temperature": 10**400}, "'temperature' is out of range"),
        ({"temperature": -1e-300}, "'temperature' must be in [0, 100]"),
        ({"temperature": 101}, "'temperature' must be in [0, 100]"),
        ({"repetition_penalty": 1e-30}, "'repetition_penalty' must be in [0.01, 100]"),
        ({"repetition_penalty": float("-inf")}, "'repetition_penalty' must be a finite number"),
        ({"stop": ["x"] * 17}, '"stop" holds at most 16 strings'),
        ({"stop": ["x" * 1025]}, '"stop" holds at most 16 strings'),
    ]:
        assert says in bad(SamplingFields.from_body, body), body
    assert SamplingFields.from_body({"seed": 2**63 - 1}).seed == 2**63 - 1


def test_a_temperature_too_small_to_divide_by_means_greedy():
    assert SamplingFields.from_body({"temperature": 1e-300}).temperature == 0.0
    assert SamplingFields.from_body({"temperature": 5e-324}, temperature=1.0).temperature == 0.0
    assert SamplingFields.from_body({"temperature": 1e-5}).temperature == 1e-5


def test_serve_blocks_must_name_a_span():
    """Issue #16 finding 15: "blocks": "" served the whole model."""
    for blocks in ("", "  "):
        assert "START:END" in bad(ServeRequest.from_body, {"model": "m", "blocks": blocks})
    assert ServeRequest.from_body({"model": "m", "blocks": "0:3"}).blocks == "0:3"


def test_prompt_size_is_checked_before_tokenizing():
    check_prompt_size(["x" * MAX_PROMPT_BYTES])
    with pytest.raises(PetalError) as info:
        check_prompt_size(["x" * (MAX_PROMPT_BYTES // 2), "y" * (MAX_PROMPT_BYTES // 2 + 1)])
    assert info.value.code == "too_large"


def test_model_names_are_bounded_and_unicode():
    assert model_field({"model": "m" * MAX_MODEL_BYTES}) == "m" * MAX_MODEL_BYTES
    assert "at most 4096" in bad(model_field, {"model": "m" * (MAX_MODEL_BYTES + 1)})
    assert "not valid Unicode" in bad(model_field, {"model": "\ud800"})
