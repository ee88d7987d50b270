"""Native text generation, /v1/generate, and the steps every generation endpoint shares (here and in openai.py).

A generation is prepared (model frontend, prompt ids, sampling) and run up to its first token before any response
is sent, so routing errors still get a real HTTP status. After that the status line is out: a stream that fails
ends with an ``{"error": ...}`` line instead. Streams are NDJSON (``application/x-ndjson``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from aiohttp import web

from petal.daemon.api.bodies import ndjson_line, read_json
from petal.daemon.api.errors import stream_error
from petal.daemon.api.frontend import Generation, ModelFrontend, Token
from petal.daemon.api.state import STATE_KEY, ApiState
from petal.kernels.sampling import SamplingParams
from petal.protocol.adapters import body_adapter
from petal.protocol.errors import PetalError
from petal.protocol.messages import CODEC_CHOICES
from petal.protocol.socket_api import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_TOKENS,
    NDJSON,
    SamplingFields,
    check_prompt_size,
)


def sampling_from(
    body: dict[str, Any], *, max_tokens_key: str = "max_new_tokens", temperature: float = 0.0
) -> SamplingParams:
    """SamplingParams from a request body; every bad field becomes a 400 that names it."""
    fields = SamplingFields.from_body(body, max_tokens_key=max_tokens_key, temperature=temperature)
    params = SamplingParams(
        max_new_tokens=fields.max_new_tokens,
        temperature=fields.temperature,
        top_k=fields.top_k,
        top_p=fields.top_p,
        repetition_penalty=fields.repetition_penalty,
        seed=fields.seed,
        stop=fields.stop,
    )
    try:
        params.validate()
    except ValueError as e:
        raise PetalError("bad_request", str(e)) from None
    if params.max_new_tokens > MAX_NEW_TOKENS:
        raise PetalError("bad_request", f"{max_tokens_key} is at most {MAX_NEW_TOKENS}")
    return params


def codec_option(body: dict[str, Any]) -> str | None:
    """The request's ``codec`` (wire codec between this daemon and the servers), None for the daemon's own."""
    codec = body.get("codec")
    if codec is not None and (not isinstance(codec, str) or codec not in CODEC_CHOICES):
        raise PetalError("bad_request", f"'codec' must be one of {list(CODEC_CHOICES)}, got {codec!r:.80}")
    return codec


def _check_prompt(ids: list[int]) -> list[int]:
    if len(ids) > MAX_PROMPT_TOKENS:
        raise PetalError("too_large", f"the prompt has {len(ids)} tokens; at most {MAX_PROMPT_TOKENS} are accepted")
    return ids


class Run:
    """One generation under way: its first token (already computed), the rest, and the totals once it ends."""

    def __init__(self, first: Token | None, rest: AsyncGenerator[Token, None], result: Generation) -> None:
        self._first, self._rest, self.result = first, rest, result

    async def tokens(self) -> AsyncIterator[Token]:
        try:
            if self._first is not None:
                yield self._first
                async for t in self._rest:
                    yield t
        finally:
            await self._rest.aclose()  # closes the inference session at once on disconnect

    async def finish(self) -> Generation:
        """Run to the end without streaming."""
        async for _ in self.tokens():
            pass
        return self.result


MAX_BEAMS = 16


def num_beams_option(body: dict[str, Any], params: SamplingParams) -> int:
    """The request's ``num_beams`` (1: no beam search); beam search is greedy and takes no repetition penalty."""
    beams = body.get("num_beams", 1)
    if beams is None:
        return 1
    if not isinstance(beams, int) or isinstance(beams, bool) or not 1 <= beams <= MAX_BEAMS:
        raise PetalError("bad_request", f"'num_beams' must be an integer in [1, {MAX_BEAMS}], got {beams!r:.40}")
    if beams > 1 and (params.temperature > 0 or params.repetition_penalty != 1.0):
        raise PetalError(
            "bad_request",
            "beam search (num_beams > 1) is greedy: leave out temperature (or set 0) and repetition_penalty",
        )
    return beams


MAX_DRAFT = 16


def speculative_option(body: dict[str, Any], params: SamplingParams, num_beams: int) -> int:
    """The request's ``speculative`` draft length (0: off); it needs greedy decoding without beams."""
    draft = body.get("speculative", 0)
    if draft is None:
        return 0
    if not isinstance(draft, int) or isinstance(draft, bool) or not 0 <= draft <= MAX_DRAFT:
        raise PetalError("bad_request", f"'speculative' must be an integer in [0, {MAX_DRAFT}], got {draft!r:.40}")
    if draft and (params.temperature > 0 or num_beams > 1):
        raise PetalError(
            "bad_request", "speculative decoding is greedy: leave out temperature (or set 0) and num_beams"
        )
    return draft


async def start_generation(
    state: ApiState,
    body: dict[str, Any],
    params: SamplingParams,
    prompt_ids: Callable[[ModelFrontend], list[int]],
    num_beams: int = 1,
    speculative: int = 0,
) -> Run:
    """Load the model's frontend, encode the prompt (in a thread) and run up to the first token; with a server-hosted
    adapter (``adapter``, or ``model`` as ``MODEL:ADAPTER``), through servers hosting it."""
    codec = codec_option(body)
    model, adapter = body_adapter(body)
    frontend = await state.frontend(model)
    ids = _check_prompt(await asyncio.to_thread(prompt_ids, frontend))
    result = Generation()
    if num_beams > 1:
        gen = frontend.generate_beams(state.router, ids, params, num_beams, result, codec=codec, adapter=adapter)
    elif speculative:
        gen = frontend.generate_speculative(
            state.router, ids, params, speculative, result, codec=codec, adapter=adapter
        )
    else:
        gen = frontend.generate(state.router, ids, params, result, codec=codec, adapter=adapter)
    try:
        first: Token | None = await gen.__anext__()
    except StopAsyncIteration:
        first = None
    return Run(first, gen, result)


async def stream_lines(
    response: web.StreamResponse, lines: AsyncGenerator[bytes, None], error_line: Callable[[dict[str, Any]], bytes]
) -> None:
    """Write ``lines``; an error after the status line went out is written in-band as the last line."""
    try:
        async with contextlib.aclosing(lines):
            async for line in lines:
                await response.write(line)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001 - reported in-band: the status line is already sent
        await response.write(error_line(stream_error(e)))


async def post_generate(request: web.Request) -> web.StreamResponse:
    """Native generation: NDJSON ``{"token", "text"}`` lines, then ``{"done": true, "text", "tokens", ...}``."""
    state = request.app[STATE_KEY]
    body = await read_json(request)
    params = sampling_from(body)
    num_beams = num_beams_option(body, params)
    speculative = speculative_option(body, params, num_beams)

    def prompt_ids(fe: ModelFrontend) -> list[int]:
        if body.get("input_ids") is not None:
            ids = body["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise PetalError("bad_request", '"input_ids" must be a list of integers')
            return ids
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise PetalError("bad_request", 'pass "prompt" (a string) or "input_ids" (a list of token ids)')
        return fe.encode(prompt, chat=bool(body.get("chat")))

    if isinstance(body.get("prompt"), str) and body.get("input_ids") is None:
        check_prompt_size([body["prompt"]])
    run = await start_generation(state, body, params, prompt_ids, num_beams, speculative)

    def final() -> dict[str, Any]:
        result = run.result
        done = {
            "done": True,
            "text": result.text,
            "tokens": result.tokens or [],
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
        }
        if speculative:
            done["speculative"] = {"steps": result.steps, "drafted": result.drafted, "accepted": result.accepted}
        return done

    if not body.get("stream", True):
        await run.finish()
        return web.json_response(final())

    async def lines() -> AsyncGenerator[bytes, None]:
        async for t in run.tokens():
            yield ndjson_line({"token": t.id, "text": t.text})
        yield ndjson_line(final())

    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    await stream_lines(response, lines(), ndjson_line)
    await response.write_eof()
    return response


def add_generate_routes(app: web.Application) -> None:
    app.router.add_post("/v1/generate", post_generate)
