"""The Python client for petald's control socket: `Client` (stdlib HTTP/1.1 over the Unix socket) and `AsyncClient`
(aiohttp), with the same methods.

JSON for control, msgpack for tensors (`petal.protocol.tensors` maps, never pickle): `forward`/`backward` run
hidden states through the swarm's blocks, `open_session` keeps an inference session (the servers' KV cache) open
across steps, `serve`/`unserve` make the local daemon host blocks or stop. Request and error bodies come from
`petal.protocol.socket_api`, the same types the daemon parses them with.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from petal.ctl.bodies import (
    MAX_REPLY_TENSOR_BYTES,
    DaemonError,
    backward_result,
    decode_json_reply,
    decode_reply,
    forward_kept_result,
    ndjson_data,
    ndjson_line,
    no_daemon,
    reply_tensor,
    session_request,
    sse_data,
    step_request,
    tensor_request,
)
from petal.ctl.websocket import HandshakeError, WebSocket, WebSocketClosed
from petal.protocol.socket_api import (
    MSGPACK,
    SESSION_STREAM_PATH,
    ServeRequest,
    UnserveRequest,
    chat_body,
    error_fields,
    generate_body,
    is_error,
)

__all__ = [
    "MAX_REPLY_TENSOR_BYTES",
    "AsyncClient",
    "AsyncClientSession",
    "AsyncStreamSession",
    "Client",
    "ClientSession",
    "DaemonError",
    "StreamSession",
    "default_socket",
]

if TYPE_CHECKING:
    import torch

    from petal.protocol.lora import Lora


def default_socket() -> Path:
    """Same rule as petald's default (petal.daemon.config.default_socket), without importing the daemon."""
    if os.environ.get("PETAL_SOCKET"):
        return Path(os.environ["PETAL_SOCKET"])
    if os.geteuid() == 0 or Path("/run/petal/petald.sock").exists():
        return Path("/run/petal/petald.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "petal" / "petald.sock"
    return Path(f"/tmp/petal-{os.getuid()}") / "petald.sock"


SHARED_TMP = Path("/tmp")
"""Where the last-resort socket dir ``petal-$UID`` lives: a place any user can create that name first."""


def check_socket_dir(socket_path: str) -> None:
    """Refuse a socket in ``/tmp/petal-$UID`` that another user made (or may write): it would answer as our daemon.

    petald refuses such a directory too; this keeps petalctl from sending prompts to the other user's socket.
    """
    directory = Path(socket_path).parent
    if directory != SHARED_TMP / f"petal-{os.getuid()}":
        return
    try:
        st = os.lstat(directory)
    except OSError:
        return  # nothing there: the connect fails with "no petald listening"
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DaemonError(
            "unavailable",
            f"{directory} is not a private directory of this user (another user may have made it, and may answer "
            f"on its socket): remove it (`sudo rm -r {directory}`), restart petald, or pass --socket",
        )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        check_socket_dir(self._path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Client:
    """Synchronous JSON calls to the local daemon."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 300.0) -> None:
        self.socket_path = str(socket_path or default_socket())
        self.timeout = timeout

    def _send(
        self, conn: _UnixConnection, method: str, path: str, body: Any, packed: bool = False
    ) -> http.client.HTTPResponse:
        if packed:
            payload: bytes | None = msgpack.packb(body, use_bin_type=True)
            headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
        else:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
        except (FileNotFoundError, ConnectionRefusedError):
            raise no_daemon(self.socket_path) from None
        return conn.getresponse()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, method, path, body)
            data = response.read()
        finally:
            conn.close()
        return decode_json_reply(response, data)

    def request_msgpack(self, method: str, path: str, body: Any = None) -> Any:
        """A msgpack request; the reply is decoded from msgpack (or, for errors, JSON -> DaemonError)."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, method, path, body, packed=True)
            data = response.read()
        finally:
            conn.close()
        return decode_reply(response.status, response.getheader("Content-Type") or "", data)

    def stream(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """Yield each JSON object of an NDJSON reply as it arrives; an in-band ``{"error"}`` line raises DaemonError."""
        return self._stream(method, path, body, "ndjson", ndjson_data)

    def events(self, method: str, path: str, body: Any = None) -> Iterator[dict[str, Any]]:
        """Yield each ``data:`` event of a Server-Sent-Events reply (the OpenAI endpoints) until ``[DONE]``; an
        in-band ``{"error"}`` event raises DaemonError."""
        return self._stream(method, path, body, "event-stream", sse_data)

    def _stream(
        self, method: str, path: str, body: Any, kind: str, data_of: Callable[[bytes], bytes | None]
    ) -> Iterator[dict[str, Any]]:
        """The JSON payload of each line of a streamed reply of Content-Type `kind`; `data_of(line)` picks the payload
        out of a line (empty: skip the line, None: the stream is over). Any other reply is decoded whole."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, method, path, body)
            ctype = response.getheader("Content-Type") or ""
            if response.status >= 400 or kind not in ctype:
                yield decode_reply(response.status, ctype, response.read())
                return
            while line := response.readline():
                data = data_of(line)
                if data is None:
                    return
                if data:
                    yield ndjson_line(data)
        finally:
            conn.close()

    def chat(self, model: str, messages: list[dict[str, str]], **options: Any) -> Iterator[str]:
        """Stream a chat completion (``/v1/chat/completions``): the answer's text pieces as they come."""
        for event in self.events("POST", "/v1/chat/completions", chat_body(model, messages, **options)):
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    def generate(self, model: str, prompt: str | None = None, **options: Any) -> Iterator[dict[str, Any]]:
        """Stream ``/v1/generate``: ``{"token", "text"}`` objects, then the final ``{"done": true, ...}``."""
        return self.stream("POST", "/v1/generate", generate_body(model, prompt, **options))

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.get("/v1/status")
        return status

    def verify(self, model: str, *, tokens: int | None = None, seed: int = 0, report: bool = False) -> dict[str, Any]:
        """``POST /v1/verify``: the same probe to every server of every span of ``model``; a verdict per server
        (``pass``, ``fail``, ``disputed``, ``unreachable``, ``unchecked``). ``report``: publish signed mismatch
        reports about those that fail."""
        body: dict[str, Any] = {"model": model, "seed": seed, "report": report}
        if tokens is not None:
            body["tokens"] = tokens
        out: dict[str, Any] = self.request("POST", "/v1/verify", body)
        return out

    # tensors

    def forward(
        self,
        model: str,
        hidden: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        lora: Lora | None = None,
        **opts: Any,
    ) -> torch.Tensor:
        """Blocks [start, end) of `model` (all by default) applied to `hidden` [B, T, H] by the swarm, no cache.

        `opts`: `codec` (the wire codec between daemon and servers), `allowed`/`blocked` (peer id lists).
        """
        body = tensor_request(model, hidden, mask=mask, prompts=prompts, start=start, end=end, lora=lora, **opts)
        return reply_tensor(self.request_msgpack("POST", "/v1/forward", body), "hidden")

    def forward_keep(
        self,
        model: str,
        hidden: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        lora: Lora | None = None,
        **opts: Any,
    ) -> tuple[torch.Tensor, str | None]:
        """`forward` whose activations the swarm keeps for a backward: (output, forward_id). Pass the id to
        `backward` (with the same arguments) and no forward runs again; the state lives 60 s at most."""
        body = tensor_request(
            model, hidden, mask=mask, prompts=prompts, start=start, end=end, lora=lora, keep=True, **opts
        )
        return forward_kept_result(self.request_msgpack("POST", "/v1/forward", body))

    def backward(
        self,
        model: str,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        lora: Lora | None = None,
        forward_id: str | None = None,
        **opts: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """(grad w.r.t. `hidden`, grad w.r.t. `prompts` or None, grads w.r.t. each LoRA tensor or None), given
        `grad` w.r.t. the output of block end-1. Servers never change their own weights. `forward_id` (from
        `forward_keep`): reuse that forward's kept activations (recomputed if they are gone)."""
        if forward_id is not None:
            opts["forward_id"] = forward_id
        body = tensor_request(
            model, hidden, grad=grad, mask=mask, prompts=prompts, start=start, end=end, lora=lora, **opts
        )
        return backward_result(self.request_msgpack("POST", "/v1/backward", body))

    def open_session(
        self,
        model: str,
        max_length: int,
        *,
        batch: int = 1,
        start: int = 0,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        **opts: Any,
    ) -> ClientSession:
        """An inference session over blocks [start, end): the servers keep the KV cache between `step`s."""
        info = self.request_msgpack(
            "POST",
            "/v1/sessions",
            session_request(model, max_length, batch=batch, start=start, end=end, prompts=prompts, **opts),
        )
        return ClientSession(self, info)

    def session_stream(
        self,
        model: str,
        max_length: int,
        *,
        batch: int = 1,
        start: int = 0,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        **opts: Any,
    ) -> StreamSession:
        """`open_session` over one WebSocket (GET /v1/sessions/stream): a step is one message each way, not one HTTP
        request. Same arguments, same `step`/`close`; closing the stream closes the session."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            check_socket_dir(self.socket_path)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise no_daemon(self.socket_path) from None
            try:
                ws = WebSocket.connect(sock, SESSION_STREAM_PATH)
            except HandshakeError as e:
                if e.status >= 400:
                    decode_reply(e.status, "application/json", e.body)  # raises the daemon's error
                raise DaemonError("bad_response", str(e)) from None
            stream = StreamSession(ws)
            stream._open(session_request(model, max_length, batch=batch, start=start, end=end, prompts=prompts, **opts))
        except BaseException:
            sock.close()
            raise
        return stream

    # serving

    def serve(
        self,
        model: str,
        *,
        blocks: str | None = None,
        num_blocks: int | None = None,
        adapters: Sequence[str] = (),
    ) -> Iterator[dict[str, Any]]:
        """Make the local daemon serve `model` (blocks "A:B", or `num_blocks` where the swarm needs them, or all),
        hosting the LoRA `adapters` ("NAME=DIR" or "DIR" on the daemon's machine) on it; yields progress events, the
        last being ``{"event": "serving", "start", "end", "throughput", "adapters"}``."""
        return self.stream("POST", "/v1/serve", ServeRequest(model, blocks, num_blocks, tuple(adapters)).to_body())

    def unserve(self, model: str, blocks: str | None = None) -> dict[str, Any]:
        """Stop serving `model` (its span `blocks` "A:B" when it serves several): ``{"model", "stopped": [...]}``."""
        stopped: dict[str, Any] = self.request("POST", "/v1/unserve", UnserveRequest(model, blocks).to_body())
        return stopped


class _OpenSession:
    """What the daemon said when it opened an inference session (POST /v1/sessions), and where it stands."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.id: str = info["session"]
        self.model: str = info["model"]
        self.start: int = info["start"]
        self.end: int = info["end"]
        self.max_length: int = info["max_length"]
        self.route: list[dict[str, Any]] = info["route"]
        self.position = 0
        self.closed = False


class ClientSession(_OpenSession):
    """An open inference session on the daemon; use as a context manager so the servers' caches are freed."""

    def __init__(self, client: Client, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.client = client

    def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        reorder: list[int] | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """The next t tokens ([B, t, H]); `mask` is [B, tokens so far + t] (1 = real, 0 = left padding); `reorder`
        (B row indices, beam search) first makes row i a copy of row `reorder[i]` on the servers; `position` (at most
        the tokens cached) first rolls the session back to it."""
        body = step_request(hidden, mask, reorder, position)
        reply = self.client.request_msgpack("POST", f"/v1/sessions/{self.id}/step", body)
        self.position = int(reply["position"])
        return reply_tensor(reply, "hidden")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.request_msgpack("DELETE", f"/v1/sessions/{self.id}")

    def __enter__(self) -> ClientSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stream_reply(data: bytes) -> dict[str, Any]:
    """A decoded session-stream message; an ``{"error"}`` message raises DaemonError."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise DaemonError("bad_response", f"daemon sent bad msgpack on the session stream: {e}") from None
    if is_error(obj):
        code, message = error_fields(obj)
        raise DaemonError(code, str(obj) if message is None else message)
    if not isinstance(obj, dict):
        raise DaemonError("bad_response", f"daemon sent a non-map on the session stream: {str(obj)[:200]}")
    return obj


def _stream_closed(e: WebSocketClosed | Exception) -> DaemonError:
    return DaemonError("unavailable", f"the session stream ended: {e}; open a new session")


class StreamSession(_OpenSession):
    """`ClientSession` over one WebSocket: `step` sends one message and reads one; use as a context manager."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.closed = False

    def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            self.ws.send(msgpack.packb(body, use_bin_type=True))
            _, data = self.ws.receive()
        except (WebSocketClosed, OSError) as e:
            self.closed = True
            self.ws.close()
            raise _stream_closed(e) from None
        return _stream_reply(data)

    def _open(self, body: dict[str, Any]) -> None:
        super().__init__(self._call(body))

    def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        reorder: list[int] | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        """The next t tokens ([B, t, H]); `mask` is [B, tokens so far + t] (1 = real, 0 = left padding); `reorder`
        (B row indices, beam search) first makes row i a copy of row `reorder[i]` on the servers; `position` (at most
        the tokens cached) first rolls the session back to it."""
        if self.closed:
            raise DaemonError("not_found", "this session stream is closed; open a new session")
        reply = self._call(step_request(hidden, mask, reorder, position))
        self.position = int(reply["position"])
        return reply_tensor(reply, "hidden")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ws.close()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls as `Client`, as coroutines over aiohttp; `async with AsyncClient() as c:` closes it."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 300.0) -> None:
        self.socket_path = str(socket_path or default_socket())
        self.timeout = timeout
        self._http: Any = None  # aiohttp.ClientSession, made inside the running loop

    def _session(self) -> Any:
        import aiohttp

        if self._http is None or self._http.closed:
            check_socket_dir(self.socket_path)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, body: Any, packed: bool) -> tuple[int, str, bytes]:
        import aiohttp

        if packed:
            kwargs: dict[str, Any] = {
                "data": msgpack.packb(body, use_bin_type=True),
                "headers": {"Content-Type": MSGPACK, "Accept": MSGPACK},
            }
        else:
            kwargs = {} if body is None else {"json": body}
        try:
            async with self._session().request(method, "http://localhost" + path, **kwargs) as r:
                return r.status, r.headers.get("Content-Type", ""), await r.read()
        except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
            raise no_daemon(self.socket_path) from None

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return decode_reply(*await self._call(method, path, body, packed=False))

    async def request_msgpack(self, method: str, path: str, body: Any = None) -> Any:
        return decode_reply(*await self._call(method, path, body, packed=True))

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.get("/v1/status")
        return status

    async def verify(
        self, model: str, *, tokens: int | None = None, seed: int = 0, report: bool = False
    ) -> dict[str, Any]:
        """``POST /v1/verify`` (see ``Client.verify``)."""
        body: dict[str, Any] = {"model": model, "seed": seed, "report": report}
        if tokens is not None:
            body["tokens"] = tokens
        out: dict[str, Any] = await self.request("POST", "/v1/verify", body)
        return out

    async def stream(self, method: str, path: str, body: Any = None) -> AsyncIterator[dict[str, Any]]:
        """Each JSON object of an NDJSON reply as it arrives; an in-band ``{"error"}`` line raises DaemonError."""
        import aiohttp

        try:
            async with self._session().request(method, "http://localhost" + path, json=body) as r:
                ctype = r.headers.get("Content-Type", "")
                if r.status >= 400 or "ndjson" not in ctype:
                    yield decode_reply(r.status, ctype, await r.read())
                    return
                async for line in r.content:
                    if line.strip():
                        yield ndjson_line(line)
        except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
            raise no_daemon(self.socket_path) from None

    def generate(self, model: str, prompt: str | None = None, **options: Any) -> AsyncIterator[dict[str, Any]]:
        return self.stream("POST", "/v1/generate", generate_body(model, prompt, **options))

    async def forward(
        self,
        model: str,
        hidden: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        lora: Lora | None = None,
        **opts: Any,
    ) -> torch.Tensor:
        body = tensor_request(model, hidden, mask=mask, prompts=prompts, start=start, end=end, lora=lora, **opts)
        return reply_tensor(await self.request_msgpack("POST", "/v1/forward", body), "hidden")

    async def forward_keep(
        self,
        model: str,
        hidden: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        lora: Lora | None = None,
        **opts: Any,
    ) -> tuple[torch.Tensor, str | None]:
        body = tensor_request(
            model, hidden, mask=mask, prompts=prompts, start=start, end=end, lora=lora, keep=True, **opts
        )
        return forward_kept_result(await self.request_msgpack("POST", "/v1/forward", body))

    async def backward(
        self,
        model: str,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        lora: Lora | None = None,
        forward_id: str | None = None,
        **opts: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        if forward_id is not None:
            opts["forward_id"] = forward_id
        body = tensor_request(
            model, hidden, grad=grad, mask=mask, prompts=prompts, start=start, end=end, lora=lora, **opts
        )
        return backward_result(await self.request_msgpack("POST", "/v1/backward", body))

    async def open_session(
        self,
        model: str,
        max_length: int,
        *,
        batch: int = 1,
        start: int = 0,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        **opts: Any,
    ) -> AsyncClientSession:
        info = await self.request_msgpack(
            "POST",
            "/v1/sessions",
            session_request(model, max_length, batch=batch, start=start, end=end, prompts=prompts, **opts),
        )
        return AsyncClientSession(self, info)

    async def session_stream(
        self,
        model: str,
        max_length: int,
        *,
        batch: int = 1,
        start: int = 0,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        **opts: Any,
    ) -> AsyncStreamSession:
        """`open_session` over one WebSocket (GET /v1/sessions/stream), as `Client.session_stream`."""
        import aiohttp

        try:
            ws = await self._session().ws_connect("http://localhost" + SESSION_STREAM_PATH, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as e:
            raise DaemonError(
                "bad_response", f"the daemon refused the session stream: {e.status} {e.message}"
            ) from None
        except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError):
            raise no_daemon(self.socket_path) from None
        stream = AsyncStreamSession(ws)
        try:
            await stream._open(
                session_request(model, max_length, batch=batch, start=start, end=end, prompts=prompts, **opts)
            )
        except BaseException:
            await ws.close()
            raise
        return stream

    def serve(
        self,
        model: str,
        *,
        blocks: str | None = None,
        num_blocks: int | None = None,
        adapters: Sequence[str] = (),
    ) -> AsyncIterator[dict[str, Any]]:
        return self.stream("POST", "/v1/serve", ServeRequest(model, blocks, num_blocks, tuple(adapters)).to_body())

    async def unserve(self, model: str, blocks: str | None = None) -> dict[str, Any]:
        stopped: dict[str, Any] = await self.request("POST", "/v1/unserve", UnserveRequest(model, blocks).to_body())
        return stopped


class AsyncClientSession(_OpenSession):
    """`ClientSession` for `AsyncClient`: `await step(...)`, `await close()`, `async with`."""

    def __init__(self, client: AsyncClient, info: dict[str, Any]) -> None:
        super().__init__(info)
        self.client = client

    async def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        reorder: list[int] | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        body = step_request(hidden, mask, reorder, position)
        reply = await self.client.request_msgpack("POST", f"/v1/sessions/{self.id}/step", body)
        self.position = int(reply["position"])
        return reply_tensor(reply, "hidden")

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.client.request_msgpack("DELETE", f"/v1/sessions/{self.id}")

    async def __aenter__(self) -> AsyncClientSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncStreamSession(_OpenSession):
    """`StreamSession` for `AsyncClient`: `await step(...)`, `await close()`, `async with`."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws  # aiohttp.ClientWebSocketResponse
        self.closed = False

    async def _call(self, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        try:
            await self.ws.send_bytes(msgpack.packb(body, use_bin_type=True))
            msg = await self.ws.receive()
        except (aiohttp.ClientError, OSError) as e:
            await self.close()
            raise _stream_closed(e) from None
        if msg.type != aiohttp.WSMsgType.BINARY:
            code = self.ws.close_code
            await self.close()
            raise _stream_closed(ConnectionError(f"{msg.type.name}, close code {code}"))
        return _stream_reply(msg.data)

    async def _open(self, body: dict[str, Any]) -> None:
        super().__init__(await self._call(body))

    async def step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None = None,
        reorder: list[int] | None = None,
        position: int | None = None,
    ) -> torch.Tensor:
        if self.closed:
            raise DaemonError("not_found", "this session stream is closed; open a new session")
        reply = await self._call(step_request(hidden, mask, reorder, position))
        self.position = int(reply["position"])
        return reply_tensor(reply, "hidden")

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.ws.close()

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
