"""`BeamSearch` equals transformers' beam search token for token (a local model, full forwards per step).

The end-of-sequence ids are chosen among tokens the random model likes, so beams do finish early and the finished
list, length penalty and stopping rules all matter; each case is also checked to have ended on EOS at least once
across the prompts (unless a length penalty > 1 favours long beams), so the test cannot pass by never finishing one.
"""

from __future__ import annotations

import pytest
import torch

from petal.kernels.beams import BeamSearch
from tests.support.tinymodels import tiny_llama


def beam_generate(model, ids: torch.Tensor, num_beams: int, max_new: int, eos: list[int], **kw) -> list[int]:
    search = BeamSearch(num_beams, max_new, eos, **kw)
    beams = ids.expand(num_beams, -1)
    while not search.done:
        with torch.no_grad():
            logits = model(beams).logits[:, -1]
        reorder, tokens = search.step(logits)
        beams = torch.cat([beams[reorder], torch.tensor(tokens)[:, None]], dim=1)
    return ids[0].tolist() + search.best


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"), [(1.0, False), (1.0, True), (2.0, "never"), (0.5, False)]
)
def test_equals_transformers(length_penalty, early_stopping):
    model = tiny_llama(num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        liked = model(torch.randint(0, 128, (4, 5), generator=g)).logits[:, -1].argmax(-1).tolist()
    eos = sorted(set(liked))[:2]
    ended = 0
    for seed in range(4):
        ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(seed))
        want = model.generate(
            ids,
            max_new_tokens=8,
            num_beams=3,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )[0].tolist()
        got = beam_generate(model, ids, 3, 8, eos, length_penalty=length_penalty, early_stopping=early_stopping)
        assert got == want, (seed, got, want)
        ended += got[-1] in eos
    assert ended > 0 or length_penalty > 1.0, (
        "no beam ended on EOS: pick other EOS ids so the finished-beam rules are exercised"
    )


def test_without_eos_runs_to_max_new_tokens():
    model = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(7))
    config = model.generation_config
    config.eos_token_id = None
    want = model.generate(ids, max_new_tokens=6, num_beams=4, do_sample=False, generation_config=config)
    got = beam_generate(model, ids, 4, 6, [])
    assert got == want[0].tolist() and len(got) == 5 + 6
