"""Control API for what this daemon hosts: serve a span now (NDJSON progress) and unserve it (JSON), through `Host`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.frontend import resolve_model
from petal.daemon.serving.errors import ServeError
from petal.daemon.serving.host import Host, HostedSpan
from petal.protocol.adapters import adapter_entries
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import NDJSON, ServeRequest, UnserveRequest

log = logging.getLogger("petal.api.serve")


@dataclass
class ServeState:
    """The one load in progress (loads run one at a time; what is served already keeps serving meanwhile)."""

    host: Host
    task: asyncio.Task[Any] | None = None
    model: str | None = None

    @property
    def loading(self) -> bool:
        return self.task is not None and not self.task.done()


SERVE_KEY = web.AppKey("serve", ServeState)


def _describe(served: Iterable[HostedSpan]) -> str:
    return ", ".join(f"{s.model} blocks [{s.start}, {s.end})" for s in served)


async def post_serve(request: web.Request) -> web.StreamResponse:
    """Load and serve a span now; NDJSON progress lines end with ``{"event": "serving", ...}`` or ``{"error"}``."""
    body = ServeRequest.from_body(await read_json(request))
    state = request.app[SERVE_KEY]
    host = state.host
    if state.loading:
        raise PetalError("conflict", f"this daemon is already loading {state.model}; wait for it to finish")
    try:
        path = resolve_model(body.model)
        state.task = asyncio.current_task()  # hold the slot while planning (no await may let a second one in)
        state.model = body.model
        plan = await host.plan(str(path), blocks=body.blocks, num_blocks=body.num_blocks)
    except ServeError as e:
        state.task = None
        raise PetalError("bad_request", str(e).replace("--blocks", '"blocks"')) from None
    except BaseException:
        state.task = None
        raise
    try:
        host.check(plan)  # beside what is served: no overlap, one rebalancing span per model, not too many models
    except ServeError as e:
        state.task = None
        served = _describe(host.served())
        raise PetalError(
            "conflict", f"{e} (this daemon serves {served}; `petalctl unserve MODEL --blocks A:B` stops one)"
        ) from None

    adapters = [(name, Path(path)) for name, path in adapter_entries(list(body.adapters))]
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def progress(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    async def load() -> None:
        # A task of its own: a client that hangs up mid-load does not leave a half-started server behind.
        try:
            await host.serve(plan, progress, adapters=adapters)
        except Exception as e:  # noqa: BLE001 - reported on the stream
            log.warning("serving %s failed: %s", plan.info.name, e)
            err = e if isinstance(e, PetalError) else PetalError("internal", f"loading failed: {type(e).__name__}: {e}")
            progress({"error": err.to_wire()})
        finally:
            progress({})  # end of stream

    state.task = asyncio.create_task(load(), name=f"serve-{plan.info.name}")
    state.model = plan.info.name
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    first = {
        "event": "resolved",
        "model": plan.info.name,
        "path": str(plan.info.path),
        "family": plan.info.family,
        "num_blocks": plan.info.num_blocks,
        "start": plan.start,
        "end": plan.end,
        "adapters": [name for name, _ in adapters],
    }
    await response.write((json.dumps(first) + "\n").encode())
    while event := await events.get():
        await response.write((json.dumps(event) + "\n").encode())
    await response.write_eof()
    return response


async def post_unserve(request: web.Request) -> web.Response:
    """Stop serving a model's span: withdraw its blocks (they show as offline), end its rebalancer, free its memory."""
    body = UnserveRequest.from_body(await read_json(request))
    model, span = body.model, body.span
    state = request.app[SERVE_KEY]
    if state.loading and state.model == model:
        raise PetalError("conflict", f"{model} is still loading; wait for its serving event, then unserve it")
    served = state.host.served()
    mine = [s for s in served if s.model == model and (span is None or (s.start, s.end) == span)]
    if not mine:
        what = _describe(served) if served else "nothing"
        blocks = "" if span is None else f" [{span[0]}, {span[1]})"
        raise PetalError("not_found", f"this daemon serves no blocks{blocks} of {model!r} (it serves {what})")
    if len(mine) > 1:
        raise PetalError(
            "conflict",
            f"this daemon serves several spans of {model} ({_describe(mine)}); name one with "
            f'"blocks": "A:B" (petalctl unserve {model} --blocks {mine[0].start}:{mine[0].end})',
        )
    stopped = await state.host.unserve(model, mine[0].start)
    spans = sorted(({"start": s.start, "end": s.end} for s in stopped), key=lambda s: s["start"])
    return web.json_response({"model": model, "stopped": spans})


def add_serve_routes(app: web.Application, host: Host) -> None:
    """Register /v1/serve and /v1/unserve on `host`; a load still running when the app stops is cancelled."""
    app[SERVE_KEY] = ServeState(host)

    async def lifetime(_: web.Application) -> AsyncIterator[None]:
        yield
        task = app[SERVE_KEY].task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/serve", post_serve)
    app.router.add_post("/v1/unserve", post_unserve)
