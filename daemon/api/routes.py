"""The control API's torch-using endpoints (models, generate, OpenAI, embeddings, tensors, session streams, serve),
wired into the app that ``LazyRoutes`` (lazy.py) builds on first use. Add new endpoints that need torch here."""

from __future__ import annotations

from aiohttp import web

from petal.daemon.api.dashboard_data import add_dashboard_data_routes
from petal.daemon.api.embeddings import add_embedding_routes
from petal.daemon.api.generate import add_generate_routes
from petal.daemon.api.models import add_model_routes
from petal.daemon.api.openai import add_openai_routes
from petal.daemon.api.serve import add_serve_routes
from petal.daemon.api.session_stream import add_session_stream_routes
from petal.daemon.api.state import NodeLike
from petal.daemon.api.tensors import add_tensor_routes
from petal.daemon.api.verify import add_verify_routes


def add_routes(app: web.Application, node: NodeLike) -> None:
    add_model_routes(app)
    add_generate_routes(app)
    add_openai_routes(app)
    add_embedding_routes(app)  # /v1/embeddings
    add_tensor_routes(app)
    add_session_stream_routes(app)  # after add_tensor_routes: the streams share its session registry
    add_serve_routes(app, node.host)
    add_verify_routes(app)  # /v1/verify, /v1/trust
    add_dashboard_data_routes(app)
