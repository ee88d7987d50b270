"""OpenAI-compatible text generation: /v1/completions and /v1/chat/completions, whole or streamed as SSE.

Shapes follow OpenAI's API (``text_completion``, ``chat.completion`` and their ``.chunk`` events, ``usage``), so
OpenAI's own clients work against the socket; the generation itself is the native one (generate.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, TypeGuard

from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.frontend import ModelFrontend
from petal.daemon.api.generate import sampling_from, start_generation, stream_lines
from petal.daemon.api.state import STATE_KEY
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import SSE, check_prompt_size, openai_max_tokens_key


def sse_event(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _valid_messages(messages: object) -> TypeGuard[list[dict[str, Any]]]:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )


async def _openai(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    body = await read_json(request)
    params = sampling_from(body, max_tokens_key=openai_max_tokens_key(body), temperature=1.0)
    if body.get("n", 1) != 1:
        raise PetalError("bad_request", '"n" other than 1 is not supported')

    def prompt_ids(fe: ModelFrontend) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not _valid_messages(messages):
                raise PetalError("bad_request", '"messages" must be a non-empty list of {"role", "content": str}')
            return fe.encode_messages([{"role": m["role"], "content": m["content"]} for m in messages])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) for i in prompt):
            return prompt
        if not isinstance(prompt, str):
            raise PetalError("bad_request", '"prompt" must be a string (or one list of token ids)')
        return fe.encode(prompt)

    if chat and _valid_messages(body.get("messages")):
        check_prompt_size(m["content"] for m in body["messages"])
    elif not chat:
        prompt = body.get("prompt")
        check_prompt_size(p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str))
    run = await start_generation(state, body, params, prompt_ids)
    result = run.result
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    common = {"id": ident, "created": created, "model": body["model"]}

    def usage() -> dict[str, int]:
        n = len(result.tokens or [])
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}

    if not body.get("stream"):
        await run.finish()
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        return web.json_response({**common, "object": kind, "choices": [choice], "usage": usage()})

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**common, "object": kind + ".chunk" if chat else kind, "choices": [c]}

    async def events() -> AsyncGenerator[bytes, None]:
        if chat:
            yield sse_event(chunk("", None, role=True))
        async for t in run.tokens():
            if t.text:
                yield sse_event(chunk(t.text, None))
        yield sse_event(chunk(None if chat else "", result.finish_reason))

    response = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache"})
    await response.prepare(request)
    await stream_lines(response, events(), sse_event)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def post_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=False)


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=True)


def add_openai_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", post_completions)
    app.router.add_post("/v1/chat/completions", post_chat_completions)
