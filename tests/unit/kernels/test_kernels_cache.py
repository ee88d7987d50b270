"""KVCache: preallocated buffers that steps fill in place, with truncate/reset for history replay."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from petal.kernels.cache import KVCache
from petal.kernels.span import Span
from petal.protocol.errors import PetalError


def test_allocate_reserves_everything_up_front() -> None:
    cache = KVCache.allocate(3, batch=2, kv_heads=4, max_length=10, head_dim=8, dtype=torch.float16, device="cpu")
    assert (cache.num_layers, cache.batch, cache.max_length, cache.length) == (3, 2, 10, 0)
    assert cache.nbytes == 2 * 3 * (2 * 4 * 10 * 8) * 2
    assert cache.keys[0].shape == (2, 4, 10, 8) and cache.dtype == torch.float16


def test_layer_slot_writes_in_place_and_returns_filled_prefix() -> None:
    cache = KVCache.allocate(2, 1, 2, 6, 4, torch.float32, "cpu")
    cache.advance(2)
    new_k, new_v = torch.ones(1, 2, 3, 4), torch.full((1, 2, 3, 4), 2.0)
    keys, _values = cache.layer(1).update(new_k, new_v, layer_idx=17)
    assert keys.shape == (1, 2, 5, 4) and keys.data_ptr() == cache.keys[1].data_ptr()
    assert torch.equal(cache.keys[1][:, :, 2:5], new_k) and torch.equal(cache.values[1][:, :, 2:5], new_v)
    assert cache.keys[0].abs().sum() == 0  # other layers untouched


def test_length_bounds() -> None:
    cache = KVCache.allocate(1, 1, 1, 4, 2, torch.float32, "cpu")
    cache.advance(3)
    with pytest.raises(ValueError, match="max_length 4"):
        cache.advance(2)
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(4)
    cache.truncate(1)
    assert cache.length == 1
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="outside"):
        KVCache(cache.keys, cache.values, length=5)
    with pytest.raises(ValueError, match="one key and one value"):
        KVCache(cache.keys, [])


def test_span_steps_never_reallocate() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=64,
        )
    ).eval()
    span = Span.from_model(model, 0, 2)
    cache = span.new_cache(1, 8, torch.float32, "cpu")
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    span.step(torch.randn(1, 3, 32), cache)
    for _ in range(5):
        span.step(torch.randn(1, 1, 32), cache)
    assert cache.length == 8
    assert [t.data_ptr() for t in cache.keys + cache.values] == pointers


@pytest.mark.parametrize(
    "hidden,batch,mask,match",
    [
        ((2, 1, 32), 1, None, "input batch is 2"),
        ((1, 2, 32), 1, (1, 3), "attention_mask"),
        ((1, 0, 32), 1, None, "tokens >= 1"),
        ((1, 1, 16), 1, None, "hidden states"),
    ],
)
def test_bad_shapes_are_wrong_shape_errors(hidden: tuple, batch: int, mask: tuple | None, match: str) -> None:
    span = Span.from_model(
        LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=1,
                vocab_size=64,
            )
        ),
        0,
        1,
    )
    with pytest.raises(PetalError, match=match) as err:
        span.step(
            torch.randn(hidden),
            span.new_cache(batch, 8, torch.float32, "cpu"),
            None if mask is None else torch.ones(mask),
        )
    assert err.value.code == "wrong_shape"
