"""Continuous batching in the kernels (`Span.step_many`, `run_batched`): several calls, each with its own cache,
positions, padding and `t`, run as one batch and give what each gives alone (fp32, |diff| <= 1e-5 x max(1, |ref|)).

Families without a batched path (BLOOM) run the calls one by one through the same entry point.
"""

from __future__ import annotations

import pytest
import torch

from petal.kernels.span import Span, batchable
from tests.support.tinymodels import tiny_bloom, tiny_llama, tiny_mistral, tiny_qwen3

ATOL = 1e-5


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert diff <= ATOL * scale, f"max |diff| {diff} > {ATOL} x {scale}"


def _calls(span: Span) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """(prefill hidden, prefill mask, later t) per session: batch 1 and 2 rows, left padding, lengths 3..9."""
    g = torch.Generator().manual_seed(3)
    h = span.hidden_size
    padded = torch.ones(2, 5, dtype=torch.long)
    padded[1, :2] = 0  # row 1 left-padded by 2
    return [
        (torch.randn(1, 3, h, generator=g), None, 1),
        (torch.randn(2, 5, h, generator=g), padded, 1),
        (torch.randn(1, 9, h, generator=g), None, 4),  # a chunk of 4 beside decode steps: mixed t
        (torch.randn(1, 6, h, generator=g), None, 1),
    ]


@pytest.mark.parametrize("build", [tiny_llama, tiny_mistral, tiny_qwen3, tiny_bloom], ids=lambda b: b.__name__)
def test_step_many_equals_each_alone(build: object) -> None:
    model = build()  # type: ignore[operator]
    span = Span.from_model(model, 1, 5)
    assert batchable(span._runner, list(span.blocks)) == (model.config.model_type != "bloom")
    calls = _calls(span)
    alone = [span.new_cache(x.shape[0], 32, torch.float32, "cpu") for x, _, _ in calls]
    batched = [span.new_cache(x.shape[0], 32, torch.float32, "cpu") for x, _, _ in calls]
    g = torch.Generator().manual_seed(4)
    masks = [m for _, m, _ in calls]
    hiddens = [x for x, _, _ in calls]
    for _ in range(3):  # round 0: prefills of different lengths batched; then steps of t = 1 (and 4)
        want = [span.step(x, c, m) for x, c, m in zip(hiddens, alone, masks, strict=True)]
        got = span.step_many(hiddens, batched, masks)
        for w, o, a, b in zip(want, got, alone, batched, strict=True):
            _close(o, w)
            assert a.length == b.length
            _close(b.keys[-1][:, :, : b.length], a.keys[-1][:, :, : a.length])
        hiddens = [
            torch.randn(x.shape[0], t, span.hidden_size, generator=g)
            for x, (_, _, t) in zip(hiddens, calls, strict=True)
        ]
        masks = [
            None if m is None else torch.cat([m, torch.ones(m.shape[0], x.shape[1], dtype=torch.long)], dim=1)
            for m, x in zip(masks, hiddens, strict=True)
        ]
