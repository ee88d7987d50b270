"""int8 weights: accuracy vs fp32, gradients w.r.t. the input, span integration (CPU; CUDA tests need a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from petal.kernels.int8 import Int8Linear, quantize_per_channel, quantize_span
from petal.kernels.span import Span
from petal.kernels.store import load_span, open_model
from tests.support.tinymodels import tiny_llama

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bitsandbytes LLM.int8)")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _linear(in_f: int = 256, out_f: int = 192, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias)


def test_quantize_per_channel_bounds_the_rounding_error():
    w = torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    w[5] = 0
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    deq = q.float() * scales[:, None]
    assert torch.all((deq - w).abs() <= scales[:, None] / 2 + 1e-12)  # per-row: half a step at most
    assert torch.equal(deq[5], torch.zeros(128))


def test_int8_linear_matches_fp32_linear():
    linear = _linear()
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        ref, out = linear(x), layer(x)
        exact = torch.nn.functional.linear(x.bfloat16().float(), layer.dequantized_weight()) + linear.bias
    assert out.shape == ref.shape and out.dtype == torch.float32
    # int8 per-channel rounding (~0.4% of a row's max) plus bf16 activations (~0.4%): 2% relative is generous
    # but still fails for any wrong scale, transposition or dropped bias (those give errors of order 100%).
    assert _rel_err(out, ref) < 0.02, _rel_err(out, ref)
    # and the kernel computes exactly the dequantized product, up to bf16 output rounding
    assert _rel_err(out, exact) < 0.01, _rel_err(out, exact)
    assert not list(layer.parameters())  # frozen: nothing for an optimizer to touch


def test_int8_backward_equals_dequantized_fp32_matmul():
    linear = _linear(bias=False)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 256, requires_grad=True)
    grad_out = torch.randn(2, 5, 192)
    layer(x).backward(grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x_ref, layer.dequantized_weight()).backward(grad_out)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert layer.weight_int8.grad is None


def test_quantized_span_is_close_and_differentiable(save_model):
    model = tiny_llama(num_hidden_layers=4)
    info = open_model(save_model(model))
    fp32, int8 = load_span(info, 0, 4), load_span(info, 0, 4, quant="int8")
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == 4 * 7
    torch.manual_seed(1)
    x = torch.randn(2, 9, 64, requires_grad=True)
    ref = fp32(x)
    out = int8(x)
    assert _rel_err(out, ref) < 0.03, _rel_err(out, ref)
    grad = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    (g_out,) = torch.autograd.grad(out, x, grad)
    assert _rel_err(g_out, g_ref) < 0.03, _rel_err(g_out, g_ref)
    cache = int8.new_cache(2, 16, torch.float32, "cpu")  # the cached path runs through int8 too
    steps = torch.cat([int8.step(x[:, :5].detach(), cache), int8.step(x[:, 5:].detach(), cache)], dim=1)
    assert _rel_err(steps, out.detach()) < 1e-2


def test_quantize_span_twice_is_refused():
    span = Span.from_model(tiny_llama(num_hidden_layers=2), 0, 2)
    quantize_span(span, "cpu")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_span(span, "cpu")


@needs_cuda
def test_cuda_llm_int8_linear_matches_fp16():
    from petal.kernels.int8 import quantize_module

    linear = _linear().half().cuda()
    holder = nn.Sequential(linear)
    ref_layer = nn.Linear(256, 192).half().cuda()
    ref_layer.load_state_dict(linear.state_dict())
    quantize_module(holder, "cuda")
    assert type(holder[0]).__name__ == "Linear8bitLt"
    x = torch.randn(4, 256, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        assert _rel_err(holder(x), ref_layer(x)) < 0.02


@needs_cuda
def test_cuda_int8_span_backward(save_model):
    info = open_model(save_model(tiny_llama(num_hidden_layers=2)))
    fp = load_span(info, 0, 2, dtype=torch.float16, device="cuda")
    q = load_span(info, 0, 2, dtype=torch.float16, device="cuda", quant="int8")
    x = torch.randn(1, 6, 64, dtype=torch.float16, device="cuda", requires_grad=True)
    ref, out = fp(x), q(x)
    assert _rel_err(out, ref) < 0.05
    (g,) = torch.autograd.grad(out.float().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.float().sum(), x)
    assert torch.isfinite(g).all() and _rel_err(g, g_ref) < 0.05
