"""Server-hosted LoRA adapters (``petald --adapter``): loaded with a span, named in its DHT record, applied to the
requests that name one (``adapter`` in a forward, backward or inference-open message).

A separate path from client-owned LoRA (weights sent with each call, `SpanCompute` applies them): here a name is
resolved to weights the server holds, and the request's compute runs inside `apply_lora` with them
(`AdapterCompute`); the base weights are never changed, so requests without an adapter (or with another) are
unaffected, and a client's own LoRA still adds on top.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from petal.daemon.serving.errors import ServeError
from petal.protocol.lora import Lora

log = logging.getLogger("petal.server")

if TYPE_CHECKING:
    from petal.daemon.serving.compute import SpanCompute
    from petal.kernels.span import Span


def load_adapters(
    dirs: Iterable[tuple[str, Path]], span: Span, device: torch.device, dtype: torch.dtype, *, strict: bool = True
) -> dict[str, Lora | None]:
    """name -> the adapter's weights for `span`'s blocks (checked against their layers), on `device` in `dtype`.

    An adapter without weights for these blocks (None) is hosted all the same: the model with it is the base model
    here.
    Blocking (reads files): run it in a thread. Raises ServeError saying which adapter and what to fix; without
    `strict` (a daemon serving several models, where each adapter fits some of them), one whose layers do not fit
    this span is left out instead, with a log line.
    """
    from petal.kernels.lora import check_lora  # lazily: torch-heavy kernels load only to serve
    from petal.kernels.peft import AdapterError, load_adapter

    adapters: dict[str, Lora | None] = {}
    pairs = list(zip(range(span.start, span.end), span.blocks, strict=True))
    for name, path in dirs:
        try:
            lora, _ = load_adapter(path.expanduser())
        except (AdapterError, OSError) as e:
            raise ServeError(f"--adapter {name}={path}: {e}") from None
        sub = lora.for_blocks(span.start, span.end)
        if sub is None:
            adapters[name] = None
            continue
        try:
            check_lora(sub, pairs)
        except Exception as e:  # noqa: BLE001 - PetalError from the check: the adapter does not fit this model
            if strict:
                raise ServeError(f"--adapter {name}={path} does not fit this model's blocks: {e}") from None
            log.info(
                "not hosting adapter %s on blocks [%d, %d): it does not fit them (%s)", name, span.start, span.end, e
            )
            continue
        adapters[name] = Lora(sub.scale, {k: t.to(device, dtype) for k, t in sub.weights.items()})
    return adapters


class AdapterCompute:
    """`SpanCompute` with a hosted adapter added to every block it runs (forward, backward, inference step)."""

    def __init__(self, base: SpanCompute, adapter: Lora) -> None:
        self.base = base
        self.adapter = adapter
        self._index = {id(b): base.span.start + i for i, b in enumerate(base.span.blocks)}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    @contextmanager
    def _applied(self, blocks: Iterable[nn.Module]) -> Iterator[None]:
        from petal.kernels.lora import apply_lora

        pairs = [(self._index[id(b)], b) for b in blocks]
        sub = self.adapter.for_blocks(min(i for i, _ in pairs), max(i for i, _ in pairs) + 1) if pairs else None
        with apply_lora(sub, pairs):
            yield

    def forward(self, req: Any) -> Any:
        with self._applied(self.base.blocks(req.start, req.end)):
            return self.base.forward(req)

    def backward(self, req: Any) -> Any:
        with self._applied(self.base.blocks(req.start, req.end)):
            return self.base.backward(req)

    def step(self, blocks: list[nn.Module], *args: Any, **kwargs: Any) -> Any:
        with self._applied(blocks):
            return self.base.step(blocks, *args, **kwargs)
