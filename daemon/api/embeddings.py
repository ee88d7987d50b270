"""OpenAI-compatible embeddings, /v1/embeddings: the mean of a text's final hidden states, over its tokens.

The hidden states are those after the model's final norm (what the head reads, and what transformers returns as
``last_hidden_state``): the last block's raw output has a scale that grows with depth and a few outlier features
that would dominate a cosine similarity; the norm removes both. Blocks run in the swarm through plain forwards (no
session); the embeddings and norm run here. ``encoding_format: "base64"`` sends little-endian float32 bytes, as
OpenAI does (its Python client asks for it by default and decodes it).
"""

from __future__ import annotations

import asyncio
import base64

import torch
from aiohttp import web

from petal.daemon.api.bodies import read_json
from petal.daemon.api.frontend import ModelFrontend
from petal.daemon.api.generate import codec_option
from petal.daemon.api.openai import FieldError, openai_errors, text_batch
from petal.daemon.api.state import STATE_KEY
from petal.protocol.errors import PetalError
from petal.protocol.socket_api import MAX_PROMPT_TOKENS, check_prompt_size

MAX_INPUTS = 256
"""Most inputs in one request."""


def final_norm(fe: ModelFrontend) -> torch.nn.Module:
    """The model's final norm among its client parts (``norm`` in Llama-like families, ``ln_f`` in BLOOM)."""
    for name in ("norm", "ln_f"):
        module = getattr(fe.parts, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise PetalError("bad_request", f"model {fe.name!r} has no final norm this daemon knows; it cannot embed text")


async def post_embeddings(request: web.Request) -> web.Response:
    """``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}``."""
    state = request.app[STATE_KEY]
    body = await read_json(request)
    inputs = text_batch(body, "input", MAX_INPUTS)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise FieldError("encoding_format", f'\'encoding_format\' must be "float" or "base64", got {fmt!r:.40}')
    codec = codec_option(body)
    check_prompt_size([v for v in inputs if isinstance(v, str)])
    fe = await state.frontend(body.get("model"))
    size = int(fe.info.config.hidden_size)
    dims = body.get("dimensions")
    if dims is not None and dims != size:
        raise FieldError("dimensions", f"'dimensions' can only be this model's hidden size {size}; leave it out")
    prompts = await asyncio.to_thread(lambda: [fe.encode(v) if isinstance(v, str) else v for v in inputs])
    for ids in prompts:
        if len(ids) > MAX_PROMPT_TOKENS:
            raise PetalError("too_large", f"an input has {len(ids)} tokens; at most {MAX_PROMPT_TOKENS} are accepted")
    hidden = await fe.final_hidden(state.router, prompts, codec)

    def pool() -> list[torch.Tensor]:
        norm = final_norm(fe)
        with torch.no_grad():
            return [norm(h.to(fe.dtype)).float().mean(dim=0) for h in hidden]

    vectors = await asyncio.to_thread(pool)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            if fmt == "base64"
            else v.tolist(),
        }
        for i, v in enumerate(vectors)
    ]
    tokens = sum(len(ids) for ids in prompts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})


def add_embedding_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", openai_errors(post_embeddings))
