"""The math of serving, run on the compute thread: a span's blocks over one request's tensors (`SpanCompute`).

No I/O and no asyncio here: requests arrive validated (`petal.protocol.messages`), replies leave as the typed
messages of `petal.protocol.replies` with their tensors encoded (one builder per RPC: `forward`, `backward`, `step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from petal.daemon import trace
from petal.daemon.serving.activations import Kept, saved_bytes
from petal.kernels.cache import KVCache
from petal.kernels.lora import apply_lora, check_lora
from petal.protocol.lora import Lora, encode_lora_grads
from petal.protocol.messages import ForwardRequest, StepRequest
from petal.protocol.replies import BackwardReply, ForwardReply, StepReply
from petal.protocol.tensors import encode_tensor

if TYPE_CHECKING:
    from petal.kernels.span import Span


class SpanCompute:
    """Blocks `[span.start, span.end)` on `device` in `dtype`; the server never trains its own weights."""

    def __init__(self, span: Span, dtype: torch.dtype, device: torch.device, lie: float = 0.0) -> None:
        self.span = span
        self.lie = lie  # TEST ONLY (petald --test-lie): relative noise on every output, a "lying" server; 0: honest
        self.dtype = dtype
        self.device = device
        self.runner = span.family.BlockRunner(span.config)
        for p in span.parameters():
            p.requires_grad_(False)  # backward asks only for grads w.r.t. inputs, prompts and the client's LoRA
        weights = [*span.parameters(), *span.buffers()]
        self._weight_ptrs = {t.untyped_storage().data_ptr() for t in weights}  # saved by autograd, but not kept
        self.forwards = 0  # span forwards run for forward/backward calls (a backward without a kept graph runs one)

    def blocks(self, start: int, end: int) -> list[nn.Module]:
        """The hosted blocks `[start, end)` (absolute indices inside the span)."""
        return list(self.span.blocks[start - self.span.start : end - self.span.start])

    def run(
        self,
        blocks: list[nn.Module],
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
        cache: KVCache | None,
        position: int,
    ) -> torch.Tensor:
        """Blocks in order, with deep prompts added before each block to positions < prompt length."""
        batch, t, _ = hidden.shape
        total = position + t
        if mask is None:
            mask = torch.ones(batch, total, dtype=torch.long, device=self.device)
        prepared = self.runner.prepare(mask.to(self.device), t, self.dtype)
        if prompts is not None:
            prompts = prompts.to(self.device, self.dtype)
        for i, block in enumerate(blocks):
            if prompts is not None:
                hidden = add_prompts(hidden, prompts[i], position)
            hidden = self.runner.run_block(block, hidden, prepared, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.advance(t)
        if self.lie:  # TEST ONLY: what spot checks must catch
            hidden = hidden + self.lie * hidden.detach().pow(2).mean().sqrt() * torch.randn_like(hidden)
        return hidden

    def _lora_on_device(self, lora: Lora | None, *, trainable: bool) -> Lora | None:
        """The request's LoRA weights on this server's device (as fresh leaves needing grad for a backward)."""
        if lora is None:
            return None
        return Lora(lora.scale, {k: t.to(self.device).requires_grad_(trainable) for k, t in lora.weights.items()})

    def forward(self, req: ForwardRequest) -> ForwardReply | KeptForward:
        """The forward RPC's reply: the span's output. With ``req.keep``, the forward runs with grad enabled and the
        reply comes with its graph (`KeptForward`) for the server to keep until the backward."""
        self.forwards += 1
        if req.keep:
            return self._forward_kept(req)
        blocks = self.blocks(req.start, req.end)
        lora = self._lora_on_device(req.lora, trainable=False)
        with torch.no_grad(), apply_lora(lora, zip(range(req.start, req.end), blocks, strict=True)):
            hidden = req.hidden.to(self.device, self.dtype)
            out = self.run(blocks, hidden, req.mask, req.prompts, None, 0)
        return ForwardReply(encode_tensor(out, req.codec))

    def _graph(self, req: ForwardRequest) -> Kept:
        """The span's forward with grad w.r.t. the input, the deep prompts and the client's LoRA weights (leaves)."""
        blocks = self.blocks(req.start, req.end)
        lora = self._lora_on_device(req.lora, trainable=True)
        with (
            torch.enable_grad(),
            apply_lora(lora, zip(range(req.start, req.end), blocks, strict=True)),
            saved_bytes(self._weight_ptrs) as saved,
        ):
            hidden = req.hidden.to(self.device, self.dtype).requires_grad_(True)
            prompts = None if req.prompts is None else req.prompts.to(self.device, self.dtype).requires_grad_(True)
            out = self.run(blocks, hidden, req.mask, prompts, None, 0)
        inputs = [hidden] if prompts is None else [hidden, prompts]
        weights = {} if lora is None else dict(lora.weights)
        nbytes = saved[0] + out.numel() * out.element_size()
        return Kept(req.start, req.end, out, inputs, weights, nbytes)

    def _forward_kept(self, req: ForwardRequest) -> KeptForward:
        kept = self._graph(req)
        return KeptForward(ForwardReply(encode_tensor(kept.output.detach(), req.codec)), kept)

    def backward(self, req: ForwardRequest) -> BackwardReply:
        """The backward RPC's reply: grads w.r.t. the input, the deep prompts and the client's LoRA weights (the
        span's forward runs again first; see `backward_kept` for the one that reuses a kept forward)."""
        self.forwards += 1
        return self.backward_kept(self._graph(req), req)

    def backward_kept(self, kept: Kept, req: ForwardRequest) -> BackwardReply:
        """The backward RPC's reply from the graph of an earlier forward (`kept`, matched to `req` by the caller)."""
        assert req.grad is not None
        leaves = kept.inputs + list(kept.lora.values())
        with torch.enable_grad():
            found = torch.autograd.grad(
                kept.output, leaves, grad_outputs=req.grad.to(self.device, self.dtype), allow_unused=True
            )
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found, strict=True)]
        n = len(kept.inputs)
        grad_prompts = None if n < 2 else encode_tensor(grads[1], req.codec)
        grad_lora = (
            None if req.lora is None else encode_lora_grads(dict(zip(kept.lora, grads[n:], strict=True)), req.codec)
        )
        return BackwardReply(encode_tensor(grads[0], req.codec), grad_prompts, grad_lora)

    def session_lora(self, lora: Lora | None, start: int, end: int) -> Lora | None:
        """An inference session's LoRA weights for blocks [start, end), checked against the blocks (PetalError if a
        key does not fit) and moved to this server's device once, at open."""
        if lora is None:
            return None
        check_lora(lora, zip(range(start, end), self.blocks(start, end), strict=True))
        return self._lora_on_device(lora, trainable=False)

    def step(
        self,
        blocks: list[nn.Module],
        step: StepRequest,
        cache: KVCache,
        codec: str,
        lora: Lora | None = None,
        first: int = 0,
    ) -> StepReply:
        """One inference step's reply: output and cache length (the cache is truncated first for a replay, then its
        rows reordered if the step asks). ``lora`` (checked and on this device: `session_lora`) applies to the
        blocks, whose first absolute index is ``first``."""
        assert step.hidden is not None
        trace.mark("compute.start")
        if step.position < cache.length:
            cache.truncate(step.position)
        if step.reorder is not None:
            cache.reorder(step.reorder)
        with torch.no_grad(), apply_lora(lora, zip(range(first, first + len(blocks)), blocks, strict=True)):
            hidden = step.hidden.to(self.device, self.dtype)
            out = self.run(blocks, hidden, step.mask, step.prompts, cache, step.position)
        reply = StepReply(cache.length, encode_tensor(out, codec))
        trace.mark("compute.end")
        return reply


@dataclass(frozen=True)
class KeptForward:
    """A forward's reply with its graph, for the server to keep (`ActivationStore`) and name in the reply."""

    reply: ForwardReply
    kept: Kept


def add_prompts(hidden: torch.Tensor, prompt: torch.Tensor, position: int) -> torch.Tensor:
    """`hidden[:, p - position] += prompt[:, p]` for the positions p in this chunk that are < prompt length."""
    t = hidden.shape[1]
    lo, hi = position, min(position + t, prompt.shape[1])
    if hi <= lo:
        return hidden
    n = hi - lo
    return torch.cat([hidden[:, :n] + prompt[:, lo:hi], hidden[:, n:]], dim=1)
