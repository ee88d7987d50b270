"""OpenAI's sampling transforms and reported log-probabilities, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from petal.kernels.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    prompt_logprobs,
    sample_next,
    token_logprob,
)


def test_penalties_follow_openais_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # token 1 generated twice, token 3 once: logit[j] -= c[j] * frequency + (c[j] > 0) * presence
    out = apply_penalties(logits, [1, 3, 1], presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0, 2.0 - 2 * 0.25 - 0.5, 3.0, 4.0 - 0.25 - 0.5]
    assert apply_penalties(logits, [1], presence=0.0, frequency=0.0) is logits
    assert apply_penalties(logits, [], presence=1.0, frequency=1.0) is logits
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # never in place
    negative = apply_penalties(logits, [0], presence=-2.0, frequency=0.0)  # a negative penalty encourages
    assert negative[0] == 3.0


def test_logit_bias_adds_and_can_ban_or_force():
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert apply_logit_bias(logits, [(1, -100.0), (2, 3.0)]).tolist() == [0.0, -95.0, 4.0]
    greedy = SamplingParams(temperature=0.0)
    assert sample_next(logits, greedy) == 1
    assert sample_next(logits, SamplingParams(logit_bias=((1, -100.0),))) == 2
    assert sample_next(logits, SamplingParams(logit_bias=((0, 100.0),))) == 0
    # sampled: a +100 bias makes the token all but certain whatever the seed
    hot = SamplingParams(temperature=1.0, logit_bias=((0, 100.0),))
    assert {sample_next(logits, hot, generator=torch.Generator().manual_seed(s)) for s in range(20)} == {0}


def test_penalties_steer_sampling_away_from_generated_tokens():
    logits = torch.tensor([3.0, 2.9, 0.0])
    params = SamplingParams(presence_penalty=0.5)
    assert sample_next(logits, params) == 0
    assert sample_next(logits, params, seen=[0], generated=[0]) == 1
    assert sample_next(logits, params, seen=[0]) == 0  # the prompt (seen alone) is not penalized


def test_validate_names_bad_fields():
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5).validate()
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=-3.0).validate()
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias=((1, 101.0),)).validate()
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams(logit_bias=((-1, 1.0),)).validate()


def test_token_logprob_is_the_raw_log_softmax_with_its_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0])
    z = math.log(math.exp(1) + math.exp(3) + math.exp(2))
    e = token_logprob(logits, 2, top=2)
    assert e.id == 2 and e.logprob == pytest.approx(2 - z)
    assert [i for i, _ in e.top] == [1, 2] and e.top[0][1] == pytest.approx(3 - z)
    assert token_logprob(logits, 0).top == ()


def test_prompt_logprobs_score_each_next_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 7)
    ids = [4, 1, 6, 2]
    out = prompt_logprobs(logits, ids, top=1)
    want = torch.log_softmax(logits, -1)
    assert [e.id for e in out] == [1, 6, 2]
    for row, e in enumerate(out):
        assert e.logprob == pytest.approx(float(want[row, ids[row + 1]]))
        assert e.top[0][0] == int(want[row].argmax())
