"""Client-owned LoRA applied to served blocks for the length of one call, without touching the blocks' weights.

A server hosts frozen (possibly int8) blocks shared by every client; each forward/backward may carry a different
client's LoRA. So the adapters are never merged or installed: `apply_lora` registers forward hooks on the named
linear layers that add ``scale * (x @ A.T) @ B.T`` (PEFT's LoRA without dropout) and removes them on exit, also on
error. The hooks are differentiable w.r.t. A and B (the client's gradients) and x, and work the same on
``nn.Linear``, bitsandbytes' ``Linear8bitLt`` (an ``nn.Linear`` subclass) and our CPU ``Int8Linear``.

Hooks fire only on the thread that registered them: a block object shared by two compute threads (tests build
several servers from one in-memory model) never sees another call's LoRA.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from petal.protocol.errors import PetalError
from petal.protocol.lora import Lora

from .families import get_family
from .int8 import Int8Linear

__all__ = ["apply_lora", "check_lora", "linear_layers", "lora_targets"]

_LINEAR_TYPES = (nn.Linear, Int8Linear)


def linear_layers(block: nn.Module) -> dict[str, nn.Linear | Int8Linear]:
    """The block's LoRA-able layers by their path inside the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if name and isinstance(m, _LINEAR_TYPES)}


def lora_targets(config: Any) -> dict[str, tuple[int, int]]:
    """A model family's LoRA-able module paths -> (in_features, out_features), from one block built on meta."""
    family = get_family(config)
    with torch.device("meta"):
        block = family.make_block(config, 0)
    return {name: (int(m.in_features), int(m.out_features)) for name, m in linear_layers(block).items()}


def _plan(lora: Lora, blocks: dict[int, nn.Module]) -> list[tuple[nn.Linear | Int8Linear, torch.Tensor, torch.Tensor]]:
    """(layer, A, B) for every LoRA pair; raises PetalError naming the first key that does not fit."""
    plan = []
    for index in lora.blocks:
        if index not in blocks:
            raise PetalError(
                "bad_request",
                f"lora has weights for block {index}, but this call runs blocks {min(blocks)}..{max(blocks)}; "
                "send only the weights of the blocks in the request",
            )
        layers = linear_layers(blocks[index])
        for path, (a, b) in lora.modules(index).items():
            layer = layers.get(path)
            if layer is None:
                raise PetalError(
                    "bad_request",
                    f"lora '{index}.{path}': block {index} has no linear layer {path!r}; "
                    f"LoRA-able modules are {', '.join(sorted(layers))}",
                )
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise PetalError(
                    "wrong_shape",
                    f"lora '{index}.{path}': lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the layer "
                    f"({layer.in_features} in, {layer.out_features} out): expected A [r, {layer.in_features}] and "
                    f"B [{layer.out_features}, r]",
                )
            plan.append((layer, a, b))
    return plan


def check_lora(lora: Lora, blocks: Iterable[tuple[int, nn.Module]]) -> None:
    """Raise PetalError unless every key of ``lora`` names a linear layer of ``blocks`` with matching shapes."""
    _plan(lora, dict(blocks))


def _hook(a: torch.Tensor, b: torch.Tensor, scale: float, thread: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != thread:
            return None
        x = args[0].to(a.dtype)
        delta = F.linear(F.linear(x, a.to(x.device)), b.to(x.device)) * scale
        return output + delta.to(output.dtype)

    return hook


@contextmanager
def apply_lora(lora: Lora | None, blocks: Iterable[tuple[int, nn.Module]]) -> Iterator[None]:
    """Within the ``with``, the given (absolute index, block) pairs compute with ``lora`` added; None: no-op.

    Every key is checked against the blocks before any hook is registered (PetalError "bad_request" for an unknown
    block or module, "wrong_shape" for A/B that do not fit the layer). The A/B tensors are used as given, so
    gradients flow to them when they require grad.
    """
    if lora is None:
        yield
        return
    plan = _plan(lora, dict(blocks))
    thread = threading.get_ident()
    handles = []
    try:
        for layer, a, b in plan:
            handles.append(layer.register_forward_hook(_hook(a, b, float(lora.scale), thread)))
        yield
    finally:
        for handle in handles:
            handle.remove()
