"""The math of serving, run on the compute thread: a span's blocks over one request's tensors (`SpanCompute`).

No I/O and no asyncio here: requests arrive validated (`petal.protocol.messages`), replies leave as the typed
messages of `petal.protocol.replies` with their tensors encoded (one builder per RPC: `forward`, `backward`, `step`;
`forward_many`, `backward_many` and `step_many` build several requests' replies from one batched run, batching.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from petal.daemon import trace
from petal.daemon.serving.activations import Kept, saved_bytes
from petal.kernels.cache import KVCache
from petal.kernels.lora import apply_lora, check_lora
from petal.kernels.span import batchable, run_batched
from petal.protocol.lora import Lora, encode_lora_grads
from petal.protocol.messages import ForwardRequest, StepRequest
from petal.protocol.replies import BackwardReply, ForwardReply, StepReply
from petal.protocol.tensors import encode_tensor

if TYPE_CHECKING:
    from petal.kernels.span import Span

R = TypeVar("R")


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

    # continuous batching (petal.daemon.serving.batching): several requests' tensors through the blocks at once

    def batchable(self, blocks: list[nn.Module]) -> bool:
        """Whether inference steps over these blocks can run batched (`step_many`): a family with a batched path."""
        return not self.lie and batchable(self.runner, blocks)

    def step_many(
        self, items: Sequence[tuple[list[nn.Module], StepRequest, KVCache, str]]
    ) -> list[StepReply | BaseException]:
        """`step` of several sessions over the same blocks (no LoRA, no deep prompts) as ONE batched forward: every
        linear layer, norm and MLP over all token rows, attention per session against its own cache. One outcome per
        item: its reply, or the error that step alone raises (a failed batch is run again one step at a time)."""
        outcomes: list[StepReply | BaseException | None] = [None] * len(items)
        ready: list[int] = []
        for i, (_, step, cache, _) in enumerate(items):
            try:
                assert step.hidden is not None and step.prompts is None
                if step.position < cache.length:
                    cache.truncate(step.position)
                if step.reorder is not None:
                    cache.reorder(step.reorder)
                if cache.length + step.hidden.shape[1] > cache.max_length:
                    raise ValueError(f"cache overflow: {cache.length} + {step.hidden.shape[1]} > {cache.max_length}")
                ready.append(i)
            except Exception as e:  # noqa: BLE001 - that step's own error, as when it runs alone
                outcomes[i] = e
        if ready:
            trace.mark("compute.start")
            try:
                with torch.no_grad():
                    outs = self._run_steps([items[i] for i in ready])
            except Exception:  # noqa: BLE001 - whose step broke the batch: each runs alone (its reorder is applied)
                for i in ready:
                    blocks, step, cache, codec = items[i]
                    plain = step if step.reorder is None else replace(step, reorder=None)
                    outcomes[i] = _outcome(self.step, blocks, plain, cache, codec)
            else:
                for i, out in zip(ready, outs, strict=True):
                    cache, codec = items[i][2], items[i][3]
                    outcomes[i] = _outcome(lambda o, c=cache, k=codec: StepReply(c.length, encode_tensor(o, k)), out)
            trace.mark("compute.end")
        return [o if o is not None else RuntimeError("step not run") for o in outcomes]

    def _run_steps(self, items: Sequence[tuple[list[nn.Module], StepRequest, KVCache, str]]) -> list[torch.Tensor]:
        hiddens, masks, caches = [], [], []
        for _, step, cache, _ in items:
            assert step.hidden is not None
            hidden = step.hidden.to(self.device, self.dtype)
            batch, t, _ = hidden.shape
            mask = step.mask
            if mask is None:
                mask = torch.ones(batch, cache.length + t, dtype=torch.long)
            hiddens.append(hidden)
            masks.append(mask.to(self.device))
            caches.append(cache)
        return run_batched(self.runner, items[0][0], hiddens, masks, caches, self.dtype)

    def forward_many(self, reqs: list[ForwardRequest]) -> list[ForwardReply | KeptForward | BaseException]:
        """`forward` of several requests of the same blocks and length (no LoRA, no prompts, not kept), concatenated
        along the batch; one reply per request (on a failure, each runs alone to tell whose it is)."""
        try:
            with torch.no_grad():
                hidden, mask = self._concat(reqs)
                out = self.run(self.blocks(reqs[0].start, reqs[0].end), hidden, mask, None, None, 0)
        except Exception:  # noqa: BLE001
            return [_outcome(self.forward, r) for r in reqs]
        self.forwards += len(reqs)
        parts = out.split([r.hidden.shape[0] for r in reqs])
        return [
            _outcome(lambda p, r: ForwardReply(encode_tensor(p, r.codec)), p, r)
            for p, r in zip(parts, reqs, strict=True)
        ]

    def backward_many(self, reqs: list[ForwardRequest]) -> list[BackwardReply | BaseException]:
        """`backward` (forward run again) of several requests of the same blocks and length, no LoRA and no prompts:
        one forward and one backward over their concatenation; grads w.r.t. each request's input."""
        try:
            with torch.enable_grad():
                hidden, mask = self._concat(reqs)
                hidden.requires_grad_(True)
                out = self.run(self.blocks(reqs[0].start, reqs[0].end), hidden, mask, None, None, 0)
                grad = torch.cat([r.grad.to(self.device, self.dtype) for r in reqs if r.grad is not None])
                (found,) = torch.autograd.grad(out, [hidden], grad_outputs=grad)
        except Exception:  # noqa: BLE001
            return [_outcome(self.backward, r) for r in reqs]
        self.forwards += len(reqs)
        parts = found.split([r.hidden.shape[0] for r in reqs])
        return [
            _outcome(lambda g, r: BackwardReply(encode_tensor(g, r.codec)), g, r)
            for g, r in zip(parts, reqs, strict=True)
        ]

    def _concat(self, reqs: list[ForwardRequest]) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = torch.cat([r.hidden.to(self.device, self.dtype) for r in reqs])
        if all(r.mask is None for r in reqs):
            return hidden, None
        masks = [
            r.mask.to(self.device, torch.long)
            if r.mask is not None
            else torch.ones(r.hidden.shape[:2], dtype=torch.long, device=self.device)
            for r in reqs
        ]
        return hidden, torch.cat(masks)


def _outcome(fn: Callable[..., R], *args: object) -> R | BaseException:
    """`fn(*args)`, or the exception it raised (one job's failure in a batch is that job's alone)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return e


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
