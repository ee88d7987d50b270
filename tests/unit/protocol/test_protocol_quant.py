"""Dynamic blockwise 8-bit quantization: the same code table, codes and values as bitsandbytes."""

import math
import warnings

import pytest
import torch

from petal.protocol import quant
from petal.protocol.errors import WireError


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.functional")


def _outlier_states(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[::577] *= 24000.0
    return x


def test_dynamic_code_equals_bitsandbytes_bit_for_bit():
    ours = quant.dynamic_code()
    theirs = _bnb().create_dynamic_map(signed=True)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert ours[quant.ZERO_INDEX] == 0.0 and ours[-1] == 1.0


def test_bin_tables_are_exact_for_every_bin():
    """Each 16-bit bin holds at most one midpoint, and the lookup agrees with a binary search at every
    place the answer can change: the bins' ends and both sides of every midpoint."""
    t = quant._tables(torch.device("cpu"))
    mid_bins = t.midpoints.view(torch.int32) >> 16
    assert mid_bins.unique().numel() == mid_bins.numel()
    high = torch.arange(1 << 16, dtype=torch.int32) << 16
    ends = torch.cat([high.view(torch.float32), (high | 0xFFFF).view(torch.float32)])
    around = torch.cat(
        [
            t.midpoints,
            torch.nextafter(t.midpoints, torch.tensor(math.inf)),
            torch.nextafter(t.midpoints, torch.tensor(-math.inf)),
        ]
    )
    points = torch.cat([ends, around])
    points = points[torch.isfinite(points)].contiguous()
    expected = torch.bucketize(points, t.midpoints)
    assert torch.equal(quant._nearest_code(points).long(), expected)


def test_nearest_code_matches_binary_search_on_random_values():
    g = torch.Generator().manual_seed(1)
    v = torch.cat(
        [
            torch.rand(200_000, generator=g) * 2 - 1,
            torch.randn(1000, generator=g) * 1e-30,
            torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45]),
        ]
    )
    assert torch.equal(quant._nearest_code(v).long(), torch.bucketize(v, quant._tables(v.device).midpoints))


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 64 * 37])
@pytest.mark.parametrize("block", [64, 256])
def test_absmax_and_values_match_bitsandbytes_cpu(n, block):
    F = _bnb()
    x = _outlier_states(n, seed=n)
    codes, absmax = quant.quantize_blockwise(x, block)
    bnb_codes, state = F.quantize_blockwise(x, blocksize=block)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert torch.equal(absmax.view(torch.int32), state.absmax.view(torch.int32))
    # our decoder reproduces bnb's dequantization of bnb's own codes exactly
    ours = quant.dequantize_blockwise(bnb_codes, state.absmax, block)
    assert torch.equal(ours.view(torch.int32), F.dequantize_blockwise(bnb_codes, state).view(torch.int32))


def test_codes_match_bitsandbytes_cpu_up_to_its_approximate_search():
    """bnb's CPU kernel finds the left neighbour with an approximate search and then compares just two
    codes, so for some values (0.14 % of N(0,1), 3.6 % of outlier-heavy states) it returns a code that is not the
    nearest (up to 4 indices off among the tiny codes near 0; the values differ by at most one code gap,
    0.0141 * absmax). We always return the nearest, so our error is never larger."""
    F = _bnb()
    x = _outlier_states(1 << 20)
    codes, absmax = quant.quantize_blockwise(x)
    bnb_codes, _ = F.quantize_blockwise(x, blocksize=64)
    differ = codes != bnb_codes
    fraction = differ.float().mean().item()
    assert fraction < 0.05  # measured: 0.14 % on N(0,1), 3.6 % with outlier channels
    code = quant.dynamic_code()
    v = (x.view(-1, 64) / absmax[:, None]).view(-1)[differ]
    ours, theirs = codes[differ].long(), bnb_codes[differ].long()
    err_ours, err_bnb = (v - code[ours]).abs(), (v - code[theirs]).abs()
    assert bool((err_ours <= err_bnb).all())
    # bnb's choice still lies within one code gap of the value (relative to the block's absmax)
    assert err_bnb.max().item() <= quant.dynamic_code().diff().max().item()


@pytest.mark.gpu
def test_cuda_path_uses_bitsandbytes_and_decodes_identically():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    F = _bnb()
    x = _outlier_states(64 * 1000 + 5).cuda()
    codes, absmax = quant.quantize_blockwise(x)
    bnb_codes, state = F.quantize_blockwise(x, blocksize=64)
    assert torch.equal(codes, bnb_codes.view(-1)) and torch.equal(absmax, state.absmax)
    cpu_codes, _cpu_absmax = quant.quantize_blockwise(x.cpu())
    assert (cpu_codes != codes.cpu()).float().mean() < 0.001
    assert torch.equal(
        quant.dequantize_blockwise(codes.cpu(), absmax.cpu()), F.dequantize_blockwise(bnb_codes, state).cpu()
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 100, 64 * 50, 64 * 50 + 17])
def test_error_within_half_the_largest_code_gap(dtype, n):
    """|x - decode(encode(x))| <= absmax * max_gap / 2 per block, plus two float32 roundings
    (normalising and scaling back), each at most 2**-24 * absmax."""
    x = _outlier_states(n, seed=7).to(dtype)
    codes, absmax = quant.quantize_blockwise(x)
    y = quant.dequantize_blockwise(codes, absmax, dtype=torch.float32)
    bound = quant.max_abs_error_bound(absmax) + absmax * 2.0**-23
    per_elem = bound.repeat_interleave(64)[:n]
    assert bool(((x.float() - y).abs() <= per_elem).all())
    gap = (quant.dynamic_code().diff().max() / 2).item()
    assert gap == pytest.approx(0.9 / 64 / 2, rel=1e-5)  # float32 rounding of the table


def test_all_zero_blocks_decode_to_exact_zero():
    x = torch.zeros(64 * 3 + 10)
    x[70] = 5.0
    codes, absmax = quant.quantize_blockwise(x)
    assert absmax.tolist() == [0.0, 5.0, 0.0, 0.0]
    assert (codes[:64] == quant.ZERO_INDEX).all() and (codes[128:] == quant.ZERO_INDEX).all()
    y = quant.dequantize_blockwise(codes, absmax)
    assert not y.isnan().any() and y[70] == 5.0 and (y[:70] == 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(200)
    x[130] = bad
    with pytest.raises(WireError, match="NaN or inf") as info:
        quant.quantize_blockwise(x)
    assert info.value.code == "bad_tensor"


def test_does_not_modify_its_input():
    x = torch.randn(300)
    before = x.clone()
    quant.quantize_blockwise(x)
    assert torch.equal(x, before)


def test_empty_and_wrong_inputs():
    codes, absmax = quant.quantize_blockwise(torch.empty(0))
    assert codes.numel() == 0 and absmax.numel() == 0
    assert quant.dequantize_blockwise(codes, absmax).numel() == 0
    with pytest.raises(WireError):
        quant.quantize_blockwise(torch.arange(10))
    with pytest.raises(WireError):
        quant.quantize_blockwise(torch.randn(10), block=0)
    with pytest.raises(WireError):
        quant.dequantize_blockwise(torch.zeros(65, dtype=torch.uint8), torch.ones(1))
