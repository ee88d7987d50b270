"""Server-hosted adapters on the wire: names only. A server loads LoRA adapters at start (``petald --adapter``), lists
their names in its DHT record (``ServerRecord.adapters``), and a request picks one by name (the field ``adapter`` of
a forward, backward or inference-open message); the weights never travel. Client-owned LoRA (``petal.protocol.lora``)
is the other path: weights sent with each call. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from petal.protocol.errors import PetalError, WireError

ADAPTER_FIELD: Final = "adapter"
"""The request field naming a server-hosted adapter (absent: the base model)."""
ADAPTER_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
"""An adapter name: short and plain (it travels in every DHT record of its server and in ``MODEL:ADAPTER``)."""
MAX_ADAPTERS: Final = 8
"""Adapters one server may host (their names must fit its DHT record)."""


def check_adapter_name(name: object) -> str:
    """``name`` if it may name an adapter; else WireError ``bad_frame`` saying what is allowed."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise WireError(
            "bad_frame",
            f"adapter name {name!r:.60} must be 1 to 32 characters of letters, digits and ._- "
            "(starting with a letter or digit)",
        )
    return name


def adapter_entries(entries: object) -> list[tuple[str, str]]:
    """(name, dir) per adapter entry "NAME=DIR", or "DIR" named after its last path part (``petald --adapter`` and
    ``/v1/serve``'s ``adapters``); raises ValueError saying what to fix for a bad name, repeats, or too many."""
    if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ValueError(f'adapters must be a list of "NAME=DIR" strings, got {entries!r:.60}')
    out = []
    for entry in entries:
        name, sep, path = entry.strip().partition("=")
        if not sep:
            path = entry.strip()
            name = path.rstrip("/").rpartition("/")[2]
        if not ADAPTER_NAME_RE.fullmatch(name):
            raise ValueError(
                f"adapter name {name!r:.60} must be 1 to 32 letters, digits and ._- (starting with a letter or digit); "
                "name it with NAME=DIR"
            )
        out.append((name, path))
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names {sorted(names)} repeat; give each a NAME=DIR of its own")
    if len(out) > MAX_ADAPTERS:
        raise ValueError(f"{len(out)} adapters: a server hosts at most {MAX_ADAPTERS}")
    return out


def request_adapter(msg: dict[str, Any], hosted: frozenset[str] | set[str]) -> str | None:
    """The adapter a block request names (None: the base model), checked against the ``hosted`` names."""
    name = msg.get(ADAPTER_FIELD)
    if name is None:
        return None
    check_adapter_name(name)
    if name not in hosted:
        have = ", ".join(sorted(hosted)) or "none"
        raise PetalError(
            "not_found",
            f"adapter {name!r} is not hosted by this server (it hosts: {have}); route to a server that lists it",
        )
    return str(name)


def split_model_adapter(model: str) -> tuple[str, str | None]:
    """``"MODEL:ADAPTER"`` -> ``("MODEL", "ADAPTER")``; a name without ``:`` (or with a path-like suffix) is a model
    alone. The OpenAI-compatible endpoints take this form in their ``model`` field."""
    base, sep, adapter = model.rpartition(":")
    if sep and base and ADAPTER_NAME_RE.fullmatch(adapter):
        return base, adapter
    return model, None


def adapter_field(body: Mapping[str, Any]) -> str | None:
    """A socket API body's ``adapter`` (a server-hosted adapter's name), None when absent; a bad name is a 400."""
    adapter = body.get(ADAPTER_FIELD)
    if adapter is None:
        return None
    try:
        return check_adapter_name(adapter)
    except WireError as e:
        raise PetalError("bad_request", f"'adapter': {e.message}") from None


def body_adapter(body: Mapping[str, Any]) -> tuple[object, str | None]:
    """(model, adapter) of a generation request: its ``adapter`` field, or its ``model`` written ``MODEL:ADAPTER``
    (the form OpenAI clients can send); None: no adapter."""
    model, adapter = body.get("model"), adapter_field(body)
    if adapter is None and isinstance(model, str):
        return split_model_adapter(model)
    return model, adapter
