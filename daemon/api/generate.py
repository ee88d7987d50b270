"""Control API handlers for models, the swarm view, routes and text generation (native and OpenAI-compatible).

Streams are NDJSON (native, ``application/x-ndjson``) or SSE (OpenAI, ``text/event-stream``). An error after a
stream has started cannot change the HTTP status any more, so it is sent as a last ``{"error": ...}`` line/event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from petal.daemon.api.frontend import Generation, ModelFrontend, Token, resolve_model
from petal.daemon.routing.router import Router, parse_model_value
from petal.kernels.sampling import SamplingParams
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY

log = logging.getLogger("petal.api")

STATUS_OF_CODE = {
    "not_found": 404,
    "bad_request": 400,
    "wrong_shape": 400,
    "max_length": 400,
    "conflict": 409,
    "busy": 503,
    "unavailable": 503,
    "no_route": 503,
    "too_large": 413,
    "bad_tensor": 400,
    "bad_frame": 400,
    "unknown_block": 400,
    "timeout": 504,
}
MAX_PROMPT_TOKENS = 8192
MAX_NEW_TOKENS = 4096


class ApiState:
    """What the generation endpoints share inside one daemon: the router and the loaded model frontends."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self._router: Router | None = None
        self._frontends: dict[str, ModelFrontend] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    @property
    def router(self) -> Router:
        if self._router is None:
            self._router = Router.for_node(self.node, codec=self.node.config.codec)  # --codec: this daemon's wire codec
        return self._router

    async def frontend(self, model: str) -> ModelFrontend:
        """The model's frontend, loaded once (in a thread: reading weights must not stall the socket)."""
        if not isinstance(model, str) or not model:
            raise PetalError("bad_request", 'name the model: "model": "smollm2"')
        lock = self._loading.setdefault(model, asyncio.Lock())
        async with lock:
            if model not in self._frontends:
                path = resolve_model(model)
                self._frontends[model] = await asyncio.to_thread(ModelFrontend, path)
            return self._frontends[model]

    async def close(self) -> None:
        if self._router is not None:
            await self._router.close()
            self._router = None


def http_error(e: PetalError) -> Exception:
    from petal.daemon.api.app import ApiError

    return ApiError(STATUS_OF_CODE.get(e.code, 502), e.code, e.message)


def _num(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PetalError("bad_request", f"{key!r} must be a {kind.__name__}, got {value!r}")
    return value


def sampling_from(
    body: dict[str, Any], *, max_tokens_key: str = "max_new_tokens", temperature: float = 0.0
) -> SamplingParams:
    """SamplingParams from a request body; every bad field becomes a 400 that names it."""
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise PetalError("bad_request", '"stop" must be a string or a list of strings')
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise PetalError("bad_request", '"seed" must be an integer')
    params = SamplingParams(
        max_new_tokens=_num(body, max_tokens_key, int, 64),
        temperature=_num(body, "temperature", float, temperature),
        top_k=_num(body, "top_k", int, 0),
        top_p=_num(body, "top_p", float, 1.0),
        repetition_penalty=_num(body, "repetition_penalty", float, 1.0),
        seed=seed,
        stop=tuple(stop),
    )
    try:
        params.validate()
    except ValueError as e:
        raise PetalError("bad_request", str(e)) from None
    if params.max_new_tokens > MAX_NEW_TOKENS:
        raise PetalError("bad_request", f"{max_tokens_key} is at most {MAX_NEW_TOKENS}")
    return params


def _check_prompt(ids: list[int]) -> list[int]:
    if len(ids) > MAX_PROMPT_TOKENS:
        raise PetalError("too_large", f"the prompt has {len(ids)} tokens; at most {MAX_PROMPT_TOKENS} are accepted")
    return ids


# --- swarm information ----------------------------------------------------------------------------------------------


async def swarm_models(state: ApiState) -> list[dict[str, Any]]:
    """Every model announced under the models key, merged over servers (fingerprint = the majority's)."""
    entries = await state.node.dht.get(MODELS_KEY)
    seen: dict[str, dict[str, Any]] = {}
    for e in entries:
        parsed = parse_model_value(e.value)
        if parsed is None:
            continue
        name, fp, n, family = parsed
        m = seen.setdefault(
            name,
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "petal",
                "family": family,
                "num_blocks": n,
                "fingerprints": {},
            },
        )
        m["fingerprints"][fp] = m["fingerprints"].get(fp, 0) + 1
    out = []
    for m in seen.values():
        fps = m.pop("fingerprints")
        m["fingerprint"] = max(fps.items(), key=lambda kv: (kv[1], kv[0]))[0]
        m["servers"] = sum(fps.values())
        out.append(m)
    return sorted(out, key=lambda m: m["id"])


def _server_json(s: Any, latency: float | None) -> dict[str, Any]:
    return {
        "peer_id": s.peer_id,
        "start": s.start,
        "end": s.end,
        "state": s.state,
        "throughput": s.throughput,
        "cache_tokens_left": s.cache_tokens_left,
        "quant": s.quant,
        "addrs": list(s.addrs),
        "latency_s": latency,
    }


async def get_models(request: web.Request) -> web.Response:
    """Models announced in the swarm; those also in the local store carry their ``path`` (clients load parts there)."""
    state = request.app[STATE_KEY]
    models = await swarm_models(state)
    for m in models:
        try:
            m["path"] = str(resolve_model(m["id"]))
        except PetalError:
            pass
    return web.json_response({"object": "list", "data": models})


async def get_swarm(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE_KEY]
    model = request.query.get("model")
    names = [model] if model else [m["id"] for m in await swarm_models(state)]
    out = []
    for name in names:
        try:
            view = await state.router.view(name, fresh=True)
        except PetalError as e:
            raise http_error(e) from None
        servers = sorted(view.servers.values(), key=lambda s: (s.start, s.end, s.peer_id))
        from petal.daemon.routing.router import uncovered

        online = [s for s in servers if s.state == "online"]
        out.append(
            {
                "model": name,
                "fingerprint": view.fingerprint,
                "num_blocks": view.num_blocks,
                "family": view.family,
                "servers": [_server_json(s, state.router.latency.get(s.peer_id)) for s in servers],
                "uncovered": [list(r) for r in uncovered(online, 0, view.num_blocks or 0)],
            }
        )
    return web.json_response({"models": out})


async def get_route(request: web.Request) -> web.Response:
    state: ApiState = request.app[STATE_KEY]
    model = request.query.get("model")
    if not model:
        raise http_error(PetalError("bad_request", "pass ?model=NAME"))
    try:
        chain = await state.router.inference_chain(model)
    except PetalError as e:
        raise http_error(e) from None
    hops = [
        {
            "peer_id": h.peer_id,
            "start": h.start,
            "end": h.end,
            "server_span": [h.server.start, h.server.end],
            "latency_s": state.router.latency.get(h.peer_id),
            "throughput": h.server.throughput,
        }
        for h in chain
    ]
    return web.json_response({"model": model, "chain": hops})


async def post_pull(request: web.Request) -> web.Response:
    from petal.daemon.api.app import read_json
    from petal.daemon.pull import PullError, pull_model

    body = await read_json(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise http_error(PetalError("bad_request", 'body must be {"name": "smollm2"}'))
    if not body.get("stream"):
        try:
            path = await asyncio.to_thread(pull_model, name, None, False)
        except PullError as e:
            raise http_error(PetalError("bad_request", str(e))) from None
        return web.json_response({"name": name, "path": str(path)})
    # streamed: one {"event": "stage"} line as each stage starts, then {"event": "done"} (or an {"error"} line)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def emit(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def pull() -> None:
        try:
            path = pull_model(name, None, False, lambda text: emit({"event": "stage", "name": name, "text": text}))
            emit({"event": "done", "name": name, "path": str(path)})
        except PullError as e:
            emit({"error": {"code": "bad_request", "message": str(e)}})
        except Exception as e:  # noqa: BLE001 - the stream has started: report in-band
            emit(_stream_error(e))
        finally:
            emit({})  # end of stream

    work = asyncio.ensure_future(asyncio.to_thread(pull))  # a client that hangs up does not stop a pull halfway
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    while event := await events.get():
        await response.write(json.dumps(event).encode() + b"\n")
    await work
    await response.write_eof()
    return response


# --- generation -----------------------------------------------------------------------------------------------------


async def _prepare(state: ApiState, body: dict[str, Any], prompt_ids: Callable[[ModelFrontend], list[int]]):
    try:
        frontend = await state.frontend(body.get("model"))  # type: ignore[arg-type]
        ids = _check_prompt(await asyncio.to_thread(prompt_ids, frontend))
    except PetalError as e:
        raise http_error(e) from None
    return frontend, ids


async def _first_then_rest(gen: AsyncIterator[Token]) -> tuple[Token | None, AsyncIterator[Token]]:
    """Run up to the first token before any response is sent, so routing errors get a real HTTP status."""
    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        return None, gen
    except PetalError as e:
        raise http_error(e) from None
    return first, gen


async def _tokens(first: Token | None, rest: AsyncIterator[Token]) -> AsyncIterator[Token]:
    try:
        if first is not None:
            yield first
            async for t in rest:
                yield t
    finally:
        await rest.aclose()  # type: ignore[attr-defined]  # closes the inference session at once on disconnect


def _stream_error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, PetalError):
        return {"error": {"code": e.code, "message": e.message}}
    log.exception("generation failed mid-stream")
    return {"error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}}


async def post_generate(request: web.Request) -> web.StreamResponse:
    """Native generation: NDJSON ``{"token", "text"}`` lines, then ``{"done": true, "text", "tokens", ...}``."""
    from petal.daemon.api.app import read_json

    state: ApiState = request.app[STATE_KEY]
    body = await read_json(request)
    try:
        params = sampling_from(body)
    except PetalError as e:
        raise http_error(e) from None

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

    frontend, ids = await _prepare(state, body, prompt_ids)
    result = Generation()
    first, rest = await _first_then_rest(frontend.generate(state.router, ids, params, result))

    def final() -> dict[str, Any]:
        return {
            "done": True,
            "text": result.text,
            "tokens": result.tokens or [],
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
        }

    if not body.get("stream", True):
        try:
            async for _ in _tokens(first, rest):
                pass
        except PetalError as e:
            raise http_error(e) from None
        return web.json_response(final())
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        async for t in _tokens(first, rest):
            line = {"token": t.id, "text": t.text}
            await response.write((json.dumps(line) + "\n").encode())
        await response.write((json.dumps(final()) + "\n").encode())
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001 - reported in-band: the status line is already sent
        await response.write((json.dumps(_stream_error(e)) + "\n").encode())
    await response.write_eof()
    return response


def _openai_body(body: dict[str, Any]) -> SamplingParams:
    try:
        return sampling_from(
            body, max_tokens_key="max_tokens" if "max_tokens" in body else "max_completion_tokens", temperature=1.0
        )
    except PetalError as e:
        raise http_error(e) from None


async def _openai(request: web.Request, chat: bool) -> web.StreamResponse:
    from petal.daemon.api.app import read_json

    state: ApiState = request.app[STATE_KEY]
    body = await read_json(request)
    params = _openai_body(body)
    if body.get("n", 1) != 1:
        raise http_error(PetalError("bad_request", '"n" other than 1 is not supported'))

    def prompt_ids(fe: ModelFrontend) -> list[int]:
        if chat:
            messages = body.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages
                )
            ):
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

    frontend, ids = await _prepare(state, body, prompt_ids)
    result = Generation()
    first, rest = await _first_then_rest(frontend.generate(state.router, ids, params, result))
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    common = {"id": ident, "created": created, "model": body["model"]}

    def usage() -> dict[str, int]:
        n = len(result.tokens or [])
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}

    if not body.get("stream"):
        try:
            async for _ in _tokens(first, rest):
                pass
        except PetalError as e:
            raise http_error(e) from None
        choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        return web.json_response({**common, "object": kind, "choices": [choice], "usage": usage()})

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(obj: Any) -> None:
        await response.write(f"data: {json.dumps(obj)}\n\n".encode())

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**common, "object": kind + ".chunk" if chat else kind, "choices": [c]}

    try:
        if chat:
            await send(chunk("", None, role=True))
        async for t in _tokens(first, rest):
            if t.text:
                await send(chunk(t.text, None))
        await send(chunk(None if chat else "", result.finish_reason))
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001 - reported in-band: the status line is already sent
        await send(_stream_error(e))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def post_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=False)


async def post_chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, chat=True)


STATE_KEY = web.AppKey("api_state", ApiState)


def add_routes(app: web.Application, node: Any) -> None:
    """Register the endpoints above and close the router with the app."""
    state = ApiState(node)
    app[STATE_KEY] = state

    async def cleanup(_: web.Application) -> None:
        await state.close()

    app.on_cleanup.append(cleanup)
    app.router.add_get("/v1/models", get_models)
    app.router.add_post("/v1/models/pull", post_pull)
    app.router.add_get("/v1/swarm", get_swarm)
    app.router.add_get("/v1/route", get_route)
    app.router.add_post("/v1/generate", post_generate)
    app.router.add_post("/v1/completions", post_completions)
    app.router.add_post("/v1/chat/completions", post_chat_completions)
