"""OpenAI-compatible text generation: /v1/completions and /v1/chat/completions, whole or streamed as SSE.

Shapes follow OpenAI's API (``text_completion``, ``chat.completion`` and their ``.chunk`` events, ``usage``,
legacy and chat ``logprobs``), so OpenAI's own clients and evaluation harnesses work against the socket; the
generation itself is the native one (frontend.py). Beyond the native fields: ``n`` choices (choice ``i`` samples
with ``seed + i``), batched prompts, ``echo`` with the prompt's log-probabilities (``max_tokens: 0`` only scores
the prompt, through one plain forward), ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` and
``stream_options.include_usage``. Every bad field is a 400 in OpenAI's error shape: ``{"error": {"message",
"type", "param", "code"}}`` (``code`` is petal's error code, as on every other endpoint).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.errors import status_of
from petal.daemon.api.frontend import Generation, ModelFrontend, Token
from petal.daemon.api.generate import Run, codec_option, sampling_from, stream_lines
from petal.daemon.api.state import STATE_KEY, ApiState
from petal.kernels.sampling import LOGIT_BIAS_RANGE, PENALTY_RANGE, SamplingParams, TokenLogprob
from petal.protocol.adapters import body_adapter
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import MAX_PROMPT_TOKENS, MAX_SEED, SSE, check_prompt_size, openai_max_tokens_key

MAX_N = 16
"""Most choices (``n``) per prompt."""
MAX_PROMPTS = 64
"""Most prompts in one /v1/completions request (a batch)."""
MAX_CHOICES = 16
"""Most generations one request runs at once (prompts x n): each holds an inference session on the servers.
Scoring only (``max_tokens: 0``) opens none, so it is bounded by ``MAX_PROMPTS`` alone."""
MAX_LOGPROBS = 5
"""Most alternatives per position for /v1/completions ``logprobs`` (OpenAI's limit)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per position for chat ``top_logprobs`` (OpenAI's limit)."""
MAX_LOGIT_BIAS = 1024
"""Most entries in ``logit_bias``."""
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")


class FieldError(PetalError):
    """A 400 about one request field: OpenAI's error body names it as ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__("bad_request", message)
        self.param = param


def openai_error(e: PetalError) -> dict[str, dict[str, str | None]]:
    """OpenAI's error body (what its clients parse), keeping petal's ``code`` and ``message``."""
    kind = "invalid_request_error" if status_of(e) < 500 else "server_error"
    return {"error": {"message": e.message, "type": kind, "param": getattr(e, "param", None), "code": e.code}}


def sse_event(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _sse_error(body: dict[str, Any]) -> bytes:
    """An error event after the stream started, in OpenAI's shape."""
    err = body["error"]
    return sse_event({"error": {**err, "type": "server_error", "param": None}})


# --- request fields -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """An OpenAI request's fields beyond the native sampling ones, checked."""

    params: SamplingParams
    n: int = 1
    logprobs: int | None = None  # alternatives per position; None: no logprobs at all
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    score_only: bool = False  # max_tokens == 0: no generation, the prompt alone (completions)


def _optional(body: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise FieldError(key, f"{key!r} must be {what}, got {value!r:.80}")
    return value


def _int_in(body: dict[str, Any], key: str, low: int, high: int, default: int | None) -> int | None:
    value = _optional(body, key, int, f"an integer in [{low}, {high}]")
    if value is None:
        return default
    if not low <= value <= high:
        raise FieldError(key, f"{key!r} must be an integer in [{low}, {high}], got {value}")
    return int(value)


def _penalty(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if value is None:
        return 0.0
    low, high = PENALTY_RANGE
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise FieldError(key, f"{key!r} must be a number in [{low:g}, {high:g}], got {value!r:.80}")
    return float(value)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    value = body.get("logit_bias")
    if value is None:
        return ()
    what = 'a map from token ids (as strings) to numbers in [-100, 100], e.g. {"50256": -100}'
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise FieldError("logit_bias", f"'logit_bias' must be {what}, with at most {MAX_LOGIT_BIAS} entries")
    out: list[tuple[int, float]] = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 12):
            raise FieldError("logit_bias", f"'logit_bias' key {key!r:.40} is not a token id; it must be {what}")
        low, high = LOGIT_BIAS_RANGE
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not low <= bias <= high:
            raise FieldError("logit_bias", f"'logit_bias' value for {key} must be a number in [-100, 100]")
        out.append((int(key), float(bias)))
    return tuple(out)


def parse_options(body: dict[str, Any], chat: bool) -> Options:
    """Every field of a completions (``chat`` False) or chat completions request, or a 400 naming the bad one."""
    key = openai_max_tokens_key(body)
    max_tokens = body.get(key)
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise FieldError(key, f"{key!r} must be an integer, got {max_tokens!r:.80}")
    minimum = 1 if chat else 0
    if max_tokens is not None and max_tokens < minimum:
        raise FieldError(key, f"{key!r} must be >= {minimum}, got {max_tokens}")
    score_only = max_tokens == 0
    try:
        params = sampling_from({**body, key: 1} if score_only else body, max_tokens_key=key, temperature=1.0)
    except PetalError as e:
        named = [k for k in (key, *SAMPLING_KEYS) if f"'{k}'" in e.message or f'"{k}"' in e.message]
        raise FieldError(named[0] if named else key, e.message) from None
    params = dataclasses.replace(
        params,
        max_new_tokens=0 if score_only else params.max_new_tokens,
        presence_penalty=_penalty(body, "presence_penalty"),
        frequency_penalty=_penalty(body, "frequency_penalty"),
        logit_bias=_logit_bias(body),
    )
    n = _int_in(body, "n", 1, MAX_N, 1) or 1
    stream = bool(_optional(body, "stream", bool, "true or false"))
    stream_options = _optional(body, "stream_options", dict, 'an object like {"include_usage": true}')
    if stream_options is not None and not stream:
        raise FieldError("stream_options", "'stream_options' is only allowed with \"stream\": true")
    include_usage = bool(_optional(stream_options or {}, "include_usage", bool, "true or false"))
    if chat:
        if body.get("echo"):
            raise FieldError("echo", "'echo' is a /v1/completions field; chat completions never echo the prompt")
        wanted = _optional(body, "logprobs", bool, "true or false")
        top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None)
        if top is not None and not wanted:
            raise FieldError("top_logprobs", "'top_logprobs' needs \"logprobs\": true")
        logprobs = (top or 0) if wanted else None
        echo = False
    else:
        logprobs = _int_in(body, "logprobs", 0, MAX_LOGPROBS, None)
        echo = bool(_optional(body, "echo", bool, "true or false"))
        if _optional(body, "suffix", str, "a string"):
            raise FieldError("suffix", "'suffix' (insertion) is not supported; send the prompt alone")
        best_of = _int_in(body, "best_of", 1, MAX_N, None)
        if best_of is not None and best_of != n:
            raise FieldError("best_of", "'best_of' other than n is not supported; ask for n choices instead")
    if score_only and stream:
        raise FieldError("stream", "'max_tokens': 0 only scores the prompt; send it without \"stream\": true")
    return Options(params, n, logprobs, echo, stream, include_usage, score_only)


def _message_text(content: object) -> str | None:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    hint = '"messages" must be a non-empty list of {"role": str, "content": str or a list of text parts}'
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", hint)
    out: list[dict[str, str]] = []
    for m in messages:
        text = _message_text(m.get("content")) if isinstance(m, dict) else None
        if text is None or not isinstance(m.get("role"), str):
            raise FieldError("messages", hint)
        out.append({"role": m["role"], "content": text})
    return out


def text_batch(body: dict[str, Any], key: str, limit: int) -> list[str | list[int]]:
    """``body[key]`` (``prompt``, or ``input`` of embeddings) as a batch: a non-empty string, a list of token ids,
    or a list of at most ``limit`` of either."""
    value = body.get(key)
    hint = f"{key!r} must be a non-empty string, a list of token ids, or a non-empty list of either (a batch)"

    def ids(v: object) -> bool:
        return isinstance(v, list) and bool(v) and all(type(i) is int for i in v)

    if isinstance(value, str) or ids(value):
        batch: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or ids(v) for v in value):
        batch = value
    else:
        raise FieldError(key, hint)
    if any(v == "" for v in batch):
        raise FieldError(key, f"{hint}; one is an empty string")
    if len(batch) > limit:
        raise FieldError(key, f"a batch holds at most {limit} items, got {len(batch)}; split it")
    return batch


# --- one generation -------------------------------------------------------------------------------------------------


class _Choice:
    """One generation (one ``choices[i]``): started up to its first token before the response is sent."""

    def __init__(self, index: int, prompt: int, gen: AsyncGenerator[Token, None], result: Generation) -> None:
        self.index, self.prompt, self.gen, self.result = index, prompt, gen, result
        self.run = Run(None, gen, result)
        self.logprobs_sent = 0
        self.offset = 0  # streamed legacy logprobs: where the next token starts in the choice's text

    async def start(self) -> None:
        try:
            first: Token | None = await self.gen.__anext__()
        except StopAsyncIteration:
            first = None
        self.run = Run(first, self.gen, self.result)

    def tokens(self) -> AsyncIterator[Token]:
        return self.run.tokens()

    async def finish(self) -> None:
        await self.run.finish()

    def new_logprobs(self) -> list[TokenLogprob]:
        """Log-probabilities of tokens generated since the last call (they may run ahead of the text held back)."""
        out = self.result.logprobs[self.logprobs_sent :]
        self.logprobs_sent = len(self.result.logprobs)
        return out


async def _all(jobs: Sequence[Awaitable[None]]) -> None:
    """Await every job; then raise the first error, if any (no job is left running)."""
    errors = [r for r in await asyncio.gather(*jobs, return_exceptions=True) if isinstance(r, BaseException)]
    if errors:
        raise errors[0]


async def _merged(choices: Sequence[_Choice]) -> AsyncGenerator[tuple[_Choice, Token | None], None]:
    """The choices' tokens as they come, interleaved; ``(choice, None)`` when a choice ends."""
    queue: asyncio.Queue[tuple[_Choice, Token | Exception | None]] = asyncio.Queue()

    async def pump(c: _Choice) -> None:
        try:
            async for t in c.tokens():
                await queue.put((c, t))
            await queue.put((c, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which reports it in-band
            await queue.put((c, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            c, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= item is None
            yield c, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- response shapes ------------------------------------------------------------------------------------------------


class Shapes:
    """Token strings and logprobs objects of one model's responses."""

    def __init__(self, frontend: ModelFrontend) -> None:
        self.tok = frontend.tokenizer
        self._names: dict[int, str] = {}

    def name(self, token: int) -> str:
        """A token's own text (special tokens included; a piece of a multi-byte character reads as U+FFFD)."""
        if token not in self._names:
            self._names[token] = "" if self.tok is None else str(self.tok.decode([token], skip_special_tokens=False))
        return self._names[token]

    def chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.name(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [{**one(e.id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    def legacy_logprobs(self, pairs: Sequence[tuple[int, TokenLogprob | None]], offset: int) -> dict[str, Any]:
        """The completions shape; ``text_offset`` counts characters of the choice's text, from ``offset``."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, e in pairs:
            text = self.name(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if e is None else e.logprob)
            out["top_logprobs"].append(None if e is None else {self.name(i): v for i, v in e.top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _prompt_pairs(ids: Sequence[int], scored: Sequence[TokenLogprob] | None) -> list[tuple[int, TokenLogprob | None]]:
    """The prompt's tokens with their log-probabilities (the first has none: nothing comes before it)."""
    rest = list(scored or [])
    return [(ids[0], None), *((e.id, e) for e in rest)]


def _decode(fe: ModelFrontend, ids: Sequence[int]) -> str:
    """A token prompt's text, special tokens included (what ``echo`` returns for it)."""
    return "" if fe.tokenizer is None else str(fe.tokenizer.decode(list(ids), skip_special_tokens=False))


# --- the endpoints --------------------------------------------------------------------------------------------------


async def _openai(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await read_json(request)
    opts = parse_options(body, chat)
    codec = codec_option(body)
    messages = chat_messages(body) if chat else None
    raw_prompts = text_batch(body, "prompt", MAX_PROMPTS) if not chat else []
    check_prompt_size([m["content"] for m in messages] if messages else [p for p in raw_prompts if isinstance(p, str)])
    if not opts.score_only and len(raw_prompts or [0]) * opts.n > MAX_CHOICES:
        raise FieldError("n", f"prompts x n is at most {MAX_CHOICES} per request, got {len(raw_prompts)} x {opts.n}")
    model, adapter = body_adapter(body)  # "MODEL:ADAPTER" or an "adapter" field: a server-hosted adapter
    fe = await state.frontend(model)
    vocab = int(fe.info.config.vocab_size)
    if any(t >= vocab for t, _ in opts.params.logit_bias):
        raise FieldError("logit_bias", f"'logit_bias' keys must be token ids below the vocab size {vocab}")

    def encode() -> list[list[int]]:
        if messages is not None:
            return [fe.encode_messages(messages)]
        return [fe.encode(p) if isinstance(p, str) else p for p in raw_prompts]

    prompts = await asyncio.to_thread(encode)
    for ids in prompts:
        if len(ids) > MAX_PROMPT_TOKENS:
            raise PetalError("too_large", f"a prompt has {len(ids)} tokens; at most {MAX_PROMPT_TOKENS} are accepted")
        if not ids:
            raise FieldError("prompt", "a prompt is empty (no tokens); send at least one token")
        if any(not 0 <= i < vocab for i in ids):
            raise FieldError("prompt", f"token ids must be in [0, {vocab}), the model's vocab")
    texts = [p if isinstance(p, str) else _decode(fe, ids) for p, ids in zip(raw_prompts, prompts, strict=False)]
    reply = _Reply(state, body, opts, fe, chat, prompts, texts, codec, adapter)
    if opts.score_only:
        return web.json_response(await reply.scored())
    choices = await reply.start()
    if not opts.stream:
        await _all([c.finish() for c in choices])
        return web.json_response(reply.whole(choices))
    response = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache"})
    await response.prepare(request)
    await stream_lines(response, reply.events(choices), _sse_error)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


class _Reply:
    """Builds one request's choices and the response (whole or as events)."""

    def __init__(
        self,
        state: ApiState,
        body: dict[str, Any],
        opts: Options,
        fe: ModelFrontend,
        chat: bool,
        prompts: list[list[int]],
        texts: list[str],
        codec: str | None,
        adapter: str | None = None,
    ) -> None:
        self.state, self.opts, self.fe, self.chat = state, opts, fe, chat
        self.prompts, self.texts, self.codec, self.adapter = prompts, texts, codec, adapter
        self.kind = "chat.completion" if chat else "text_completion"
        self.shapes = Shapes(fe)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.common = {"id": ident, "created": int(time.time()), "model": body["model"]}

    def _prompt_scoring(self) -> int | None:
        return self.opts.logprobs if self.opts.echo else None

    async def start(self) -> list[_Choice]:
        """Every choice run up to its first token (errors still get a real HTTP status); choice ``i`` of a prompt
        samples with ``seed + i``."""
        p = self.opts.params
        choices = []
        for pi, ids in enumerate(self.prompts):
            for i in range(self.opts.n):
                seed = None if p.seed is None else (p.seed + i) % MAX_SEED
                result = Generation()
                gen = self.fe.generate(
                    self.state.router,
                    ids,
                    dataclasses.replace(p, seed=seed),
                    result,
                    logprobs=self.opts.logprobs,
                    prompt_logprobs=self._prompt_scoring(),
                    codec=self.codec,
                    adapter=self.adapter,
                )
                choices.append(_Choice(pi * self.opts.n + i, pi, gen, result))
        try:
            await _all([c.start() for c in choices])
        except BaseException:
            await asyncio.gather(*(c.gen.aclose() for c in choices), return_exceptions=True)
            raise
        return choices

    def usage(self, choices: Sequence[_Choice]) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(len(c.result.tokens or []) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _echo(self, pi: int) -> str:
        return self.texts[pi] if self.opts.echo else ""

    def _legacy(
        self, pi: int, scored_prompt: Sequence[TokenLogprob] | None, new: Sequence[TokenLogprob]
    ) -> dict[str, Any] | None:
        """Legacy logprobs of the echoed prompt (when echoing) and the generated tokens ``new``."""
        if self.opts.logprobs is None:
            return None
        pairs = _prompt_pairs(self.prompts[pi], scored_prompt) if self.opts.echo else []
        head = self.shapes.legacy_logprobs(pairs, 0)
        tail = self.shapes.legacy_logprobs([(e.id, e) for e in new], len(self._echo(pi)))
        return {k: head[k] + tail[k] for k in head}

    async def scored(self) -> dict[str, Any]:
        """``max_tokens: 0``: the prompts alone, echoed and scored when asked (one plain forward, no session)."""
        scores: list[list[TokenLogprob] | None] = [None] * len(self.prompts)
        top = self._prompt_scoring()
        if top is not None:
            hidden = await self.fe.final_hidden(self.state.router, self.prompts, self.codec, self.adapter)
            for pi, (h, ids) in enumerate(zip(hidden, self.prompts, strict=True)):
                scores[pi] = await asyncio.to_thread(self.fe.score_hidden, h[:-1], ids, top)
        choices = [
            {
                "index": pi * self.opts.n + i,
                "text": self._echo(pi),
                "logprobs": self._legacy(pi, scores[pi], []),
                "finish_reason": "length",
            }
            for pi in range(len(self.prompts))
            for i in range(self.opts.n)
        ]
        return {**self.common, "object": self.kind, "choices": choices, "usage": self.usage([])}

    def whole(self, choices: Sequence[_Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            r = c.result
            item: dict[str, Any] = {"index": c.index, "finish_reason": r.finish_reason}
            if self.chat:
                item["message"] = {"role": "assistant", "content": r.text}
                item["logprobs"] = None if self.opts.logprobs is None else self.shapes.chat_logprobs(r.logprobs)
            else:
                item["text"] = self._echo(c.prompt) + r.text
                item["logprobs"] = self._legacy(c.prompt, r.prompt_logprobs, r.logprobs)
            out.append(item)
        return {**self.common, "object": self.kind, "choices": out, "usage": self.usage(choices)}

    def _event(self, items: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        event = {**self.common, "object": self.kind + ".chunk" if self.chat else self.kind, "choices": items}
        if self.opts.include_usage:
            event["usage"] = usage
        return sse_event(event)

    def _chunk(self, c: _Choice, text: str | None, finish: str | None) -> bytes:
        """A chunk of ``text``, with the logprobs of the tokens generated since the last chunk."""
        new = c.new_logprobs()
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            logprobs = None if self.opts.logprobs is None else self.shapes.chat_logprobs(new)
            return self._event([{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        legacy = None
        if self.opts.logprobs is not None:
            legacy = self.shapes.legacy_logprobs([(e.id, e) for e in new], c.offset)
            if legacy["tokens"]:
                c.offset = legacy["text_offset"][-1] + len(legacy["tokens"][-1])
        return self._event([{"index": c.index, "text": text or "", "logprobs": legacy, "finish_reason": finish}])

    def _opening(self, c: _Choice) -> bytes | None:
        """A choice's first event: the assistant role (chat), or the echoed prompt with its logprobs."""
        if self.chat:
            item = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            return self._event([{**item, "finish_reason": None}])
        c.offset = len(self._echo(c.prompt))
        if not self.opts.echo:
            return None
        logprobs = self._legacy(c.prompt, c.result.prompt_logprobs, [])
        return self._event(
            [{"index": c.index, "text": self._echo(c.prompt), "logprobs": logprobs, "finish_reason": None}]
        )

    async def events(self, choices: Sequence[_Choice]) -> AsyncGenerator[bytes, None]:
        try:
            for c in choices:
                opening = self._opening(c)
                if opening is not None:
                    yield opening
            async for c, t in _merged(choices):
                if t is None:
                    yield self._chunk(c, None if self.chat else "", c.result.finish_reason)
                elif t.text:
                    yield self._chunk(c, t.text, None)
            if self.opts.include_usage:
                yield self._event([], self.usage(choices))
        finally:  # a client gone before every choice streamed: their inference sessions close now
            await asyncio.gather(*(c.gen.aclose() for c in choices), return_exceptions=True)


def openai_errors(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Errors before the response started, in OpenAI's shape (with the HTTP status every endpoint uses)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except PetalError as e:
            return web.json_response(openai_error(e), status=status_of(e))

    return wrapped


async def post_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=False)


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=True)


def add_openai_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", openai_errors(post_completions))
    app.router.add_post("/v1/chat/completions", openai_errors(post_chat_completions))
