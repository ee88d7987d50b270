"""The client side of the socket's bodies: tensors into request maps, and replies (or errors) out of responses.

Shared by `Client` and `AsyncClient`; other languages build the same maps. The tensor-free fields come from
`petal.protocol.socket_api`, which the daemon parses them with. torch is imported only when a tensor is encoded or
decoded, so that `petalctl` commands without tensors start fast.
"""

from __future__ import annotations

import http.client
import json
from typing import TYPE_CHECKING, Any

import msgpack

from petal.protocol.socket_api import MSGPACK, SessionRequest, error_fields

if TYPE_CHECKING:
    import torch

    from petal.protocol.lora import Lora

MAX_REPLY_TENSOR_BYTES = 1 << 40  # the local daemon is trusted to size its replies; decoding still checks structure


class DaemonError(RuntimeError):
    """The daemon answered with an error, or could not be reached; `code` is the API's error code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def _enc(t: torch.Tensor | None) -> dict[str, Any] | None:
    from petal.protocol.tensors import encode_tensor  # lazily: torch's import would slow every petalctl command

    return None if t is None else encode_tensor(t, "none")


def _dec(obj: Any) -> torch.Tensor:
    from petal.protocol.tensors import decode_tensor

    return decode_tensor(obj, max_bytes=MAX_REPLY_TENSOR_BYTES)


def tensor_request(
    model: str,
    hidden: torch.Tensor,
    *,
    grad: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
    start: int = 0,
    end: int | None = None,
    lora: Lora | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """The msgpack body of /v1/forward (and, with `grad`, /v1/backward)."""
    body: dict[str, Any] = {"model": model, "hidden": _enc(hidden), "start": start, "end": end, **opts}
    for key, t in (("grad", grad), ("mask", mask), ("prompts", prompts)):
        if t is not None:
            body[key] = _enc(t)
    if lora is not None:
        from petal.protocol.lora import encode_lora

        body["lora"] = encode_lora(lora, "none")
    return body


def session_request(
    model: str,
    max_length: int,
    *,
    batch: int = 1,
    start: int = 0,
    end: int | None = None,
    prompts: torch.Tensor | None = None,
    lora: Lora | None = None,
    **opts: Any,
) -> dict[str, Any]:
    """The msgpack body of POST /v1/sessions (and the first message of the session stream); `lora` is sent once,
    here, and applied by the servers to every step."""
    body: dict[str, Any] = {
        **SessionRequest(model, max_length, batch).to_body(),
        "start": start,
        "end": end,
        "prompts": _enc(prompts),
        **opts,
    }
    if lora is not None:
        from petal.protocol.lora import encode_lora

        body["lora"] = encode_lora(lora, "none")
    return body


def step_request(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    reorder: list[int] | None = None,
    position: int | None = None,
) -> dict[str, Any]:
    """A session step's body; `reorder` (beam search) makes row i a copy of row `reorder[i]` before the step;
    `position` (at most the tokens cached) rolls the session back there first (rejected speculative guesses)."""
    body: dict[str, Any] = {"hidden": _enc(hidden), "mask": _enc(mask)}
    if reorder is not None:
        body["reorder"] = [int(i) for i in reorder]
    if position is not None:
        body["position"] = int(position)
    return body


def reply_tensor(reply: Any, key: str) -> torch.Tensor:
    if not isinstance(reply, dict) or reply.get(key) is None:
        raise DaemonError("bad_response", f"the daemon's reply lacks {key!r}: {str(reply)[:200]}")
    return _dec(reply[key])


def forward_kept_result(reply: Any) -> tuple[torch.Tensor, str | None]:
    """The output and ``forward_id`` of a forward with ``keep`` (None from a daemon that predates it)."""
    fid = reply.get("forward_id") if isinstance(reply, dict) else None
    return reply_tensor(reply, "hidden"), fid if isinstance(fid, str) else None


def backward_result(reply: Any) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
    grad = reply_tensor(reply, "grad")
    grad_prompts = None if reply.get("grad_prompts") is None else reply_tensor(reply, "grad_prompts")
    lora = reply.get("grad_lora")
    grad_lora = None if lora is None else {k: _dec(v) for k, v in lora.items()}
    return grad, grad_prompts, grad_lora


def no_daemon(socket_path: str) -> DaemonError:
    return DaemonError(
        "unavailable",
        f"no petald listening on {socket_path}: start one with `petald --new-swarm` "
        "(or `systemctl start petald`), or pass --socket",
    )


def ndjson_data(line: bytes) -> bytes:
    return line.strip()


def sse_data(line: bytes) -> bytes | None:
    if not line.startswith(b"data: "):
        return b""
    data = line[6:].strip()
    return None if data == b"[DONE]" else data


def ndjson_line(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise DaemonError("bad_response", f"daemon sent a non-JSON line: {line[:200]!r}") from None
    if isinstance(obj, dict) and "error" in obj:
        code, message = error_fields(obj)
        raise DaemonError(code, str(obj) if message is None else message)
    line_obj: dict[str, Any] = obj
    return line_obj


def decode_reply(status: int, content_type: str, data: bytes) -> Any:
    """A reply body by its Content-Type: msgpack, else JSON; a status >= 400 raises DaemonError."""
    if MSGPACK in content_type and status < 400:
        try:
            return msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
            raise DaemonError("bad_response", f"daemon sent bad msgpack ({status}): {e}") from None
    try:
        decoded = json.loads(data) if data else None
    except json.JSONDecodeError:
        raise DaemonError("bad_response", f"daemon sent non-JSON ({status}): {data[:200]!r}") from None
    if status >= 400:
        code, message = error_fields(decoded)
        raise DaemonError(code, str(decoded) if message is None else message, status)
    return decoded


def decode_json_reply(response: http.client.HTTPResponse, data: bytes) -> Any:
    return decode_reply(response.status, "application/json", data)
