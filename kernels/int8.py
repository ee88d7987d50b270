"""8-bit weights for the blocks a server hosts: half (vs bf16) or a quarter (vs fp32) of the weight memory.

CPU: weight-only int8 with one scale per output channel, multiplied by `torch._weight_int8pack_mm` with bf16
activations. Measured on SmolLM2 (2 cores): faster than fp32 (the matmul reads 4x fewer weight bytes) at
~98-99% top-1 agreement with fp32; see docs/benchmarks.md.
CUDA: bitsandbytes' LLM.int8 (`Linear8bitLt`, outlier threshold 6.0), as in the Petals paper.

Servers never train their own weights, but fine-tuning clients need gradients w.r.t. the span's input, so
the CPU matmul is an autograd Function whose backward multiplies by the dequantized weight (no weight grads).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["Int8Linear", "quantize_module", "quantize_per_channel", "quantize_span"]

LLM_INT8_THRESHOLD = 6.0


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: returns (int8 weight [out, in], float32 scales [out])."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows stay exactly zero
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


class _AutogradCtx(Protocol):
    """What our autograd Functions use of torch's ctx (torch's stubs type `saved_tensors` as a 1-tuple)."""

    saved_tensors: tuple[torch.Tensor, ...]
    needs_input_grad: tuple[bool, ...]

    def save_for_backward(self, *tensors: torch.Tensor) -> None: ...


class _Int8MatMul(torch.autograd.Function):
    """y = x @ (q * scales).T with the int8 kernel; backward gives grad wrt x only (weights are frozen)."""

    @staticmethod
    def forward(ctx: _AutogradCtx, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, scales)
        flat = x.reshape(-1, x.shape[-1]).to(scales.dtype)
        y = torch._weight_int8pack_mm(flat, q, scales)
        return y.reshape(*x.shape[:-1], q.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx: _AutogradCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        q, scales = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = q.to(grad_out.dtype) * scales.to(grad_out.dtype)[:, None]
        return grad_out @ w, None, None


class Int8Linear(nn.Module):
    """Drop-in for a frozen `nn.Linear` on CPU: int8 weight + per-channel scales, activations in `compute_dtype`.

    Outputs come back in the input's dtype. The weight is a buffer, not a parameter: it is never trained.
    """

    weight_int8: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_int8: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.in_features = weight_int8.shape[1]
        self.out_features = weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        q, scales = quantize_per_channel(linear.weight)
        return cls(q, scales, linear.bias, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer effectively multiplies by (for tests and error analysis)."""
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = _Int8MatMul.apply(x, self.weight_int8, self.scales)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.scales.dtype}"


def _cuda_int8_linear(linear: nn.Linear, device: torch.device) -> nn.Module:
    """bitsandbytes LLM.int8: int8 weights, fp16 outlier columns above the threshold; quantizes on `.to(cuda)`."""
    from bitsandbytes.nn.modules import Int8Params, Linear8bitLt

    layer = Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=LLM_INT8_THRESHOLD,
    )
    layer.weight = Int8Params(
        linear.weight.detach().to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", torch.float16), requires_grad=False)
    moved: nn.Module = layer.to(device)  # type: ignore[no-untyped-call]  # bitsandbytes: Linear8bitLt.to is unannotated
    return moved


def quantize_module(module: nn.Module, device: torch.device | str) -> int:
    """Replace every `nn.Linear` inside `module` with its int8 form for `device`; returns how many were replaced."""
    device = torch.device(device)
    replaced = 0
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is not nn.Linear:
                continue
            if device.type == "cuda":
                new = _cuda_int8_linear(sub, device)
            elif device.type == "cpu":
                new = Int8Linear.from_linear(sub)
            else:
                raise ValueError(f"int8 weights are supported on cpu and cuda, not {device.type}; use quant='none'")
            setattr(child, attr, new)
            replaced += 1
    return replaced


def quantize_span(span: nn.Module, device: torch.device | str) -> nn.Module:
    """Quantize the linear layers of every block of `span` in place (norms and embeddings stay as they are)."""
    count = quantize_module(span, device)
    if count == 0:
        raise ValueError("the span has no nn.Linear layers to quantize (already quantized?)")
    return span
