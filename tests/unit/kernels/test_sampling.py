"""The pure sampler: greedy, repetition penalty as transformers applies it, top-k/top-p filtering, seeds."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from petal.kernels.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample_next


def test_greedy_is_argmax_and_penalty_matches_transformers():
    logits = torch.tensor([1.0, 3.0, -2.0, 2.9])
    assert sample_next(logits, SamplingParams()) == 1
    want = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[1, 2]]), logits[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, [1, 2, 2], 1.5), want)
    assert sample_next(logits, SamplingParams(repetition_penalty=1.5), seen=[1]) == 3


def test_top_k_and_top_p_only_draw_from_the_kept_tokens():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    g = make_generator(0)
    draws = {sample_next(logits, SamplingParams(temperature=5.0, top_k=2), generator=g) for _ in range(200)}
    assert draws == {0, 1}
    # probabilities ~ [.66, .24, .09, ...]: top_p 0.8 keeps the two tokens needed to reach 0.8
    draws = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), generator=g) for _ in range(300)}
    assert draws == {0, 1}
    assert {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.1), generator=g) for _ in range(50)} == {0}


def test_seed_repeats_and_temperature_spreads():
    logits = torch.zeros(50)
    p = SamplingParams(temperature=1.0, seed=3)
    a = [sample_next(logits, p, generator=g) for g in [make_generator(3)] for _ in range(20)]
    b = [sample_next(logits, p, generator=g) for g in [make_generator(3)] for _ in range(20)]
    assert a == b and len(set(a)) > 5


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(stop=("",)),
    ],
)
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()
