"""Continuous batching on a server: which queued jobs may run together, and how a batch of them runs.

The compute thread (`worker.ComputeWorker`) takes the next job by priority; when that job carries a `Batch`, it also
takes every queued job of the same priority whose `Batch.key` is equal, in arrival order, while their tokens fit the
server's budget (`petald --max-batch-tokens`, token rows = batch x tokens summed over the
jobs; a job alone always runs, however large), and calls `Batch.run` once with all their items. Sessions join and
leave between steps naturally: each step is its own job, so whatever is queued when the thread comes back is batched.

- Inference steps (`step_batch`): steps of sessions over the same blocks of the base span (no client LoRA, no deep
  prompts, no hosted adapter, a family with a batched path: `petal.kernels.span.batchable`) run as ONE forward: all
  token rows through every linear layer, norm and MLP together, attention per session against its own cache
  (`petal.kernels.span.run_batched`); `t` may differ (a prefill beside decode steps). Each step's result goes out
  through its own `send` as soon as the batch is done, unless its session gave up on it.
- Forward and backward calls (`forward_batch`): the same blocks and sequence length, no LoRA and no deep prompts
  (their grads would mix), not kept for a later backward: concatenated along the batch dimension.

Results equal each job run alone up to float rounding (tests/unit/daemon/test_batching.py).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from petal.daemon.serving.compute import SpanCompute

if TYPE_CHECKING:
    from torch import nn

    from petal.kernels.cache import KVCache
    from petal.protocol.messages import ForwardRequest, StepRequest
    from petal.protocol.replies import StepReply


@dataclass(frozen=True)
class Batch:
    """How a job may join others: jobs with equal `key` (and priority) run together through `run`, which takes the
    `item` of every job of the batch (this one first) and returns one outcome per item, in order (an exception
    instance for a job that failed on its own); `tokens` counts against the budget."""

    key: Hashable
    tokens: int
    run: Callable[[list[Any]], Sequence[object]]
    item: object


@dataclass(frozen=True)
class StepItem:
    """One session's step in a batch: what `SpanCompute.step_many` needs, and `done(reply)`, the session's own
    ending of the job (send the reply on unless abandoned; `InferenceSession._compute`)."""

    compute: SpanCompute
    blocks: list[nn.Module]
    step: StepRequest
    cache: KVCache
    codec: str
    done: Callable[[StepReply], tuple[StepReply, bool]]


def step_batch(
    compute: object,
    blocks: list[nn.Module],
    step: StepRequest,
    cache: KVCache,
    codec: str,
    done: Callable[[StepReply], tuple[StepReply, bool]],
    *,
    lora: object,
    first: int,
) -> Batch | None:
    """The `Batch` of an inference step, or None when it must run alone (see the module docstring)."""
    if type(compute) is not SpanCompute or lora is not None or step.prompts is not None or step.hidden is None:
        return None
    if not compute.batchable(blocks):
        return None
    tokens = int(step.hidden.shape[0] * step.hidden.shape[1])
    key = ("step", id(compute), first, first + len(blocks))
    return Batch(key, tokens, run_steps, StepItem(compute, blocks, step, cache, codec, done))


def run_steps(items: list[StepItem]) -> list[object]:
    """Steps of several sessions as one batched forward, each step then ended by its session (sent on)."""
    compute = items[0].compute
    replies: Sequence[StepReply | BaseException] = compute.step_many(
        [(i.blocks, i.step, i.cache, i.codec) for i in items]
    )
    outcomes: list[object] = []
    for item, reply in zip(items, replies, strict=True):
        if isinstance(reply, BaseException):
            outcomes.append(reply)
            continue
        try:
            outcomes.append(item.done(reply))
        except Exception as e:  # noqa: BLE001 - delivered to that step's handler, as when it runs alone
            outcomes.append(e)
    return outcomes


def forward_batch(compute: object, req: ForwardRequest, *, backward: bool) -> Batch | None:
    """The `Batch` of a forward (or a backward that runs its forward again), or None when it must run alone."""
    if type(compute) is not SpanCompute or compute.lie or req.lora is not None or req.prompts is not None:
        return None
    if req.keep or (backward and req.grad is None):
        return None
    batch, t = int(req.hidden.shape[0]), int(req.hidden.shape[1])
    key = ("backward" if backward else "forward", id(compute), req.start, req.end, t)
    return Batch(key, batch * t, compute.backward_many if backward else compute.forward_many, req)
