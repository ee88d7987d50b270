"""The control socket's request and error bodies: what petalctl sends and petald reads, defined once for both.

``petal.ctl.client`` builds these bodies and ``petal.daemon.api`` parses them with the same types, so field
names, defaults, limits and the 400 messages that name a bad field cannot drift apart. Wire shapes only, no I/O
and no torch (petalctl imports this at start-up); tensors inside bodies are ``petal.protocol.tensors`` maps.
``docs/api.yaml`` describes the same bodies for other languages, and the tests validate against it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from .adapters import adapter_entries
from .errors import PetalError

MSGPACK: Final = "application/x-msgpack"
"""Content-Type of tensor bodies (requests and replies)."""
NDJSON: Final = "application/x-ndjson"
"""Content-Type of the native streams: one JSON object a line."""
SSE: Final = "text/event-stream"
"""Content-Type of the OpenAI-compatible streams: ``data: {json}`` events, then ``data: [DONE]``."""

MAX_PROMPT_TOKENS: Final = 8192
"""Longest prompt (in tokens) a generation request may carry."""
MAX_NEW_TOKENS: Final = 4096
"""Most tokens one generation request may ask for."""
MAX_BYTES_PER_TOKEN: Final = 64
MAX_PROMPT_BYTES: Final = MAX_PROMPT_TOKENS * MAX_BYTES_PER_TOKEN
"""Longest prompt text (UTF-8 bytes, all chat messages together) read at all: no tokenizer packs more than
``MAX_BYTES_PER_TOKEN`` bytes of real text into a token, so a longer prompt could not fit ``MAX_PROMPT_TOKENS``
and is refused before it is tokenized."""
MAX_MODEL_BYTES: Final = 4096
"""Longest model name (or model dir path) in UTF-8 bytes."""
MIN_TEMPERATURE: Final = 1e-5
"""A temperature above 0 but below this samples greedily: dividing logits by less overflows to inf."""
MAX_TEMPERATURE: Final = 100.0
REPETITION_PENALTY_RANGE: Final = (0.01, 100.0)
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 1024
MAX_SEED: Final = 2**63
DEFAULT_MAX_NEW_TOKENS: Final = 64
MODEL_HINT: Final = 'name the model: "model": "smollm2"'

Body = Mapping[str, object]
"""A decoded JSON or msgpack request body (a map with string keys)."""


# --- errors ---------------------------------------------------------------------------------------------------------


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The body of every error: an HTTP error reply, or the last line/event of a stream that failed mid-way."""
    return {"error": {"code": code, "message": message}}


def error_fields(body: object) -> tuple[str, str | None]:
    """(code, message) of an error body; ``"error"`` and None for the parts it lacks."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "error", None
    code, message = err.get("code", "error"), err.get("message")
    return (code if isinstance(code, str) else "error"), (message if isinstance(message, str) else None)


# --- field readers (each bad field is a "bad_request" that names it) ------------------------------------------------


def bad_request(message: str) -> PetalError:
    return PetalError("bad_request", message)


def model_field(body: Body) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(MODEL_HINT)
    try:
        size = len(model.encode("utf-8"))
    except UnicodeEncodeError:
        raise bad_request(f"'model' {model[:60]!r} is not valid Unicode") from None
    if size > MAX_MODEL_BYTES:
        raise bad_request(f"'model' is {size} bytes; a model name has at most {MAX_MODEL_BYTES}")
    return model


def check_prompt_size(texts: Iterable[str]) -> None:
    """Refuse (``too_large``), before tokenizing, prompt text longer than ``MAX_PROMPT_TOKENS`` tokens could be."""
    size = 0
    for text in texts:
        size += len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_PROMPT_BYTES:
            raise PetalError(
                "too_large",
                f"the prompt is over {MAX_PROMPT_BYTES} bytes, more than the {MAX_PROMPT_TOKENS}-token limit can "
                "hold; send a shorter prompt",
            )


def int_field(body: Body, key: str, default: int | None, minimum: int = 0) -> int | None:
    """``body[key]`` as an integer >= ``minimum``; absent or null gives ``default``."""
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"{key!r} must be an integer >= {minimum}, got {value!r:.80}")
    return value


def peers_field(body: Body, key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise bad_request(f"{key!r} must be a list of peer ids")
    return value


def _number(body: Body, key: str, kind: type[int] | type[float], default: int | float) -> int | float:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise bad_request(f"{key!r} is out of range, got {value!r:.40}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise bad_request(f"{key!r} must be a {kind.__name__}, got {value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{key!r} must be a finite number, got {value!r}")
    return value


def _in_range(key: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise bad_request(f"{key!r} must be in [{low:g}, {high:g}], got {value!r:.40}")
    return value


# --- generation -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingFields:
    """The sampling fields of /v1/generate (``max_new_tokens``) and the OpenAI endpoints (``max_tokens``).

    Types are checked here; ranges by ``petal.kernels.sampling.SamplingParams.validate`` and ``MAX_NEW_TOKENS``.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_body(
        cls, body: Body, *, max_tokens_key: str = "max_new_tokens", temperature: float = 0.0
    ) -> SamplingFields:
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list):
            raise bad_request('"stop" must be a string or a list of strings')
        if len(stop) > MAX_STOP_STRINGS or any(isinstance(x, str) and len(x) > MAX_STOP_CHARS for x in stop):
            raise bad_request(f'"stop" holds at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters')
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise bad_request('"seed" must be an integer')
        if seed is not None and not 0 <= seed < MAX_SEED:
            raise bad_request(f'"seed" must be in [0, 2**63), got {seed!r:.40}')
        temperature = _in_range("temperature", _number(body, "temperature", float, temperature), 0, MAX_TEMPERATURE)
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # greedy: what such a temperature means, without the overflow
        penalty = _number(body, "repetition_penalty", float, 1.0)
        return cls(
            max_new_tokens=int(_number(body, max_tokens_key, int, DEFAULT_MAX_NEW_TOKENS)),
            temperature=temperature,
            top_k=int(_number(body, "top_k", int, 0)),
            top_p=_number(body, "top_p", float, 1.0),
            repetition_penalty=_in_range("repetition_penalty", penalty, *REPETITION_PENALTY_RANGE),
            seed=seed,
            stop=tuple(stop),  # element types are checked by SamplingParams.validate, with its message
        )


def openai_max_tokens_key(body: Body) -> str:
    """``max_tokens`` (completions) or ``max_completion_tokens`` (newer chat clients): whichever the body uses."""
    return "max_tokens" if "max_tokens" in body else "max_completion_tokens"


def generate_body(model: str, prompt: str | None = None, **options: object) -> dict[str, object]:
    """A streamed /v1/generate request: ``prompt`` (or ``input_ids`` in options) and the sampling fields."""
    return {"model": model, "stream": True, **({"prompt": prompt} if prompt is not None else {}), **options}


def chat_body(model: str, messages: list[dict[str, str]], **options: object) -> dict[str, object]:
    """A streamed /v1/chat/completions request."""
    return {"model": model, "messages": messages, "stream": True, **options}


# --- tensors and sessions (the tensors themselves are added by each side) -------------------------------------------


@dataclass(frozen=True)
class RouteOptions:
    """Which blocks [start, end) and servers a forward, backward or session uses, and the daemon's wire codec."""

    start: int = 0
    end: int | None = None
    codec: str | None = None
    allowed: list[str] | None = None
    blocked: list[str] | None = None

    @classmethod
    def from_body(cls, body: Body, codecs: Collection[str]) -> RouteOptions:
        codec = body.get("codec")
        if codec is not None and (not isinstance(codec, str) or codec not in codecs):
            raise bad_request(f"'codec' must be one of {list(codecs)}, got {codec!r:.80}")
        return cls(
            start=int_field(body, "start", 0) or 0,
            end=int_field(body, "end", None, 1),
            codec=codec,
            allowed=peers_field(body, "allowed"),
            blocked=peers_field(body, "blocked"),
        )


@dataclass(frozen=True)
class SessionRequest:
    """POST /v1/sessions without its tensors (``prompts``) and route options."""

    model: str
    max_length: int
    batch: int = 1
    push: bool = True  # servers push each step's output to the next hop; False: the local daemon relays every hop

    @classmethod
    def from_body(cls, body: Body) -> SessionRequest:
        model = model_field(body)
        max_length = int_field(body, "max_length", None, 1)
        if max_length is None:
            raise bad_request('"max_length" (the most tokens this session will hold) is required')
        push = body.get("push", True)
        if not isinstance(push, bool):
            raise bad_request('"push" must be true or false')
        return cls(model, max_length, int_field(body, "batch", 1, 1) or 1, push)

    def to_body(self) -> dict[str, object]:
        return {"model": self.model, "max_length": self.max_length, "batch": self.batch, "push": self.push}


# --- streamed inference sessions ------------------------------------------------------------------------------------

SESSION_STREAM_PATH: Final = "/v1/sessions/stream"
"""``GET`` upgraded to a WebSocket: one inference session as one long-lived stream instead of one request per step.

Every message is a binary WebSocket message holding one msgpack map:

- the client's first message opens the session, with the fields of ``POST /v1/sessions`` (``model``,
  ``max_length``, ``batch``, ``start``, ``end``, ``prompts``, route options, ``codec``); the reply is what that
  endpoint answers (``session``, ``start``, ``end``, ``max_length``, ``batch``, ``route``);
- every later message is a step ``{hidden, mask?}``, answered by ``{hidden, position}``;
- a message that fails is answered by ``{"error": {"code", "message"}}`` (``error_body``) and the stream stays
  usable (an open that failed may be sent again); replies come in the order of the messages;
- closing the WebSocket closes the session (the servers free its cache). The daemon closes the stream itself
  (``SESSION_GONE`` close code) when the session is gone: idle too long, or the daemon is stopping.
"""
SESSION_GONE: Final = 4000
"""WebSocket close code (private range) the daemon closes a session stream with once its session no longer exists."""


def is_error(message: object) -> bool:
    """Whether a decoded stream message is an ``{"error": ...}`` reply."""
    return isinstance(message, dict) and "error" in message and len(message) == 1


# --- serving --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeRequest:
    """POST /v1/serve: a span given as ``blocks`` "A:B", or ``num_blocks`` placed where the swarm needs them, or all;
    ``adapters``: LoRA adapter dirs ("NAME=DIR" or "DIR", on the daemon's machine) to host on it, as ``--adapter``."""

    model: str
    blocks: str | None = None
    num_blocks: int | None = None
    adapters: tuple[str, ...] = ()

    @classmethod
    def from_body(cls, body: Body) -> ServeRequest:
        model = model_field(body)
        blocks = body.get("blocks")
        if blocks is not None and (not isinstance(blocks, str) or not blocks.strip()):
            raise bad_request(f'"blocks" must be a string "START:END", e.g. "0:10", got {blocks!r:.40}')
        num_blocks = int_field(body, "num_blocks", None, 1)
        if blocks is not None and num_blocks is not None:
            raise bad_request('pass either "blocks": "A:B" or "num_blocks": N, not both')
        adapters = body.get("adapters", [])
        try:
            adapter_entries(adapters)
        except ValueError as e:
            raise bad_request(f'"adapters": {e}') from None
        assert isinstance(adapters, (list, tuple))  # adapter_entries checked: a list of strings
        return cls(model, blocks, num_blocks, tuple(str(a) for a in adapters))

    def to_body(self) -> dict[str, object]:
        body: dict[str, object] = {"model": self.model}
        if self.blocks is not None:
            body["blocks"] = self.blocks
        if self.num_blocks is not None:
            body["num_blocks"] = self.num_blocks
        if self.adapters:
            body["adapters"] = list(self.adapters)
        return body


@dataclass(frozen=True)
class UnserveRequest:
    """POST /v1/unserve: the model's span (``blocks`` "A:B" names one when the daemon serves several of it)."""

    model: str
    blocks: str | None = None

    @classmethod
    def from_body(cls, body: Body) -> UnserveRequest:
        blocks = body.get("blocks")
        if blocks is not None and (not isinstance(blocks, str) or not _SPAN_RE.fullmatch(blocks.strip())):
            raise bad_request(f'"blocks" must be a string "START:END", e.g. "0:10", got {blocks!r:.40}')
        return cls(model_field(body), None if blocks is None else blocks.strip())

    @property
    def span(self) -> tuple[int, int] | None:
        if self.blocks is None:
            return None
        a, b = self.blocks.split(":")
        return int(a), int(b)

    def to_body(self) -> dict[str, object]:
        body: dict[str, object] = {"model": self.model}
        if self.blocks is not None:
            body["blocks"] = self.blocks
        return body


_SPAN_RE = re.compile(r"\d{1,9}:\d{1,9}")
