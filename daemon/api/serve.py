"""Control API for what this daemon hosts: serve a span now (NDJSON progress) and unserve it (JSON)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from aiohttp import web

from petal.daemon.api.generate import STATE_KEY, http_error
from petal.daemon.api.tensors import _fail, _int, _model
from petal.protocol.errors import PetalError
from petal.protocol.records import MODELS_KEY

log = logging.getLogger("petal.api.serve")


@dataclass
class ServeState:
    """The one load in progress (a daemon hosts one span at a time: its block-server protocols have one handler)."""

    task: asyncio.Task[None] | None = None
    model: str | None = None


SERVE_KEY = web.AppKey("serve", ServeState)


def _served(node: Any) -> list[tuple[str, int, int]]:
    from petal.daemon.serving.server import BlockServer

    return [(s.model, s.span.start, s.span.end) for s in node.servers if isinstance(s, BlockServer)]


def _describe(served: Iterable[tuple[str, int, int]]) -> str:
    return ", ".join(f"{m} blocks [{a}, {b})" for m, a, b in served)


async def post_serve(request: web.Request) -> web.StreamResponse:
    """Load and serve a span now; NDJSON progress lines end with ``{"event": "serving", ...}`` or ``{"error"}``."""
    from petal.daemon.api.app import read_json
    from petal.daemon.api.frontend import resolve_model
    from petal.daemon.serving.server import ServeError, plan_serving, serve_plan

    body = await read_json(request)
    model = _model(body)
    blocks = body.get("blocks")
    if blocks is not None and not isinstance(blocks, str):
        raise _fail("bad_request", '"blocks" must be a string "START:END", e.g. "0:10"')
    num_blocks = _int(body, "num_blocks", None, 1)
    if blocks is not None and num_blocks is not None:
        raise _fail("bad_request", 'pass either "blocks": "A:B" or "num_blocks": N, not both')
    node = request.app[STATE_KEY].node
    state = request.app[SERVE_KEY]
    if state.task is not None and not state.task.done():
        raise _fail("conflict", f"this daemon is already loading {state.model}; wait for it to finish")
    if served := _served(node):
        raise _fail(
            "conflict",
            f"this daemon already serves {_describe(served)}; a daemon hosts one span at a "
            f"time: `petalctl unserve {served[0][0]}` first, or start another daemon",
        )
    try:
        path = resolve_model(model)
        state.task = asyncio.current_task()  # hold the slot while planning (no await may let a second one in)
        state.model = model
        plan = await plan_serving(node, str(path), blocks=blocks, num_blocks=num_blocks)
    except PetalError as e:
        state.task = None
        raise http_error(e) from None
    except ServeError as e:
        state.task = None
        raise _fail("bad_request", str(e).replace("--blocks", '"blocks"')) from None
    except BaseException:
        state.task = None
        raise

    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def progress(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    async def load() -> None:
        # A task of its own: a client that hangs up mid-load does not leave a half-started server behind.
        try:
            group = await serve_plan(node, plan, progress)
            node.servers = group  # the Rebalancer (if any) replaces the server inside this very list when it moves
        except Exception as e:  # noqa: BLE001 - reported on the stream
            log.warning("serving %s failed: %s", plan.info.name, e)
            err = e if isinstance(e, PetalError) else PetalError("internal", f"loading failed: {type(e).__name__}: {e}")
            progress({"error": err.to_wire()})
        finally:
            progress({})  # end of stream

    state.task = asyncio.create_task(load(), name=f"serve-{plan.info.name}")
    state.model = plan.info.name
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    first = {
        "event": "resolved",
        "model": plan.info.name,
        "path": str(plan.info.path),
        "family": plan.info.family,
        "num_blocks": plan.info.num_blocks,
        "start": plan.start,
        "end": plan.end,
    }
    await response.write((json.dumps(first) + "\n").encode())
    while event := await events.get():
        await response.write((json.dumps(event) + "\n").encode())
    await response.write_eof()
    return response


async def post_unserve(request: web.Request) -> web.Response:
    """Stop serving a model: withdraw its blocks (they show as offline), end its rebalancer, free its memory."""
    from petal.daemon.api.app import read_json
    from petal.daemon.serving.server import BlockServer

    body = await read_json(request)
    model = _model(body)
    node = request.app[STATE_KEY].node
    state = request.app[SERVE_KEY]
    if state.task is not None and not state.task.done() and state.model == model:
        raise _fail("conflict", f"{model} is still loading; wait for its serving event, then unserve it")
    served = _served(node)
    if not any(m == model for m, _, _ in served):
        what = _describe(served) if served else "nothing"
        raise _fail("not_found", f"this daemon serves no blocks of {model!r} (it serves {what})")
    group, node.servers = node.servers, []
    stopped = []
    for item in reversed(group):  # the rebalancer first, so it cannot move the server being stopped
        if isinstance(item, BlockServer):
            stopped.append({"start": item.span.start, "end": item.span.end})
        await item.stop()
    try:
        await asyncio.wait_for(node.withdraw(MODELS_KEY), timeout=3.0)
    except Exception as e:  # noqa: BLE001 - the entry expires on its own
        log.info("could not withdraw %s from %s: %s", model, MODELS_KEY, e)
    del group
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return web.json_response({"model": model, "stopped": sorted(stopped, key=lambda s: s["start"])})


def add_serve_routes(app: web.Application) -> None:
    """Register /v1/serve and /v1/unserve; a load still running when the app stops is cancelled."""
    app[SERVE_KEY] = ServeState()

    async def lifetime(_: web.Application) -> AsyncIterator[None]:
        yield
        task = app[SERVE_KEY].task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/serve", post_serve)
    app.router.add_post("/v1/unserve", post_unserve)
