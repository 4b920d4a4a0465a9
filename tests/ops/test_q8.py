"""quantize_q8 / linear_q8: native kernels against the pure-PyTorch references.

quantize_q8 divides and rounds like the float32 reference, so codes and scales are bit-identical.
linear_q8 keeps activations in float32: |y - y_ref| <= (K + 12) * 2^-24 * sum_k |x_k w_k| + one output ulp
(float32 summation bound; K covers the scalar path's sequential sum, the AVX2 path sums K/8 per lane).
"""
import pytest
import torch

import pyshrink.ops as ops
from pyshrink.ops import q8

from _opsutil import exact_bound

SHAPES = [(200, 7), (576, 33), (1000, 130)]  # (K, N)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_reference(isa, gen, K, N, dtype):
    w = (torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen)).to(dtype)
    w[0] = 0  # zero row: scale 0, codes 0
    q, s = ops.quantize_q8(w)
    qr, sr = q8.quantize_q8_reference(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert (q != qr).sum().item() == 0  # mismatch rate exactly 0
    assert torch.equal(s, sr) and s[0] == 0
    # round trip: within half a step everywhere (+ the float32 rounding of w / scale, <= 127 * 2^-24 codes)
    err = (q.double() * s.double()[:, None] - w.double()).abs()
    assert (err <= s.double()[:, None] * (0.5 + 1e-5)).all()


def test_quantize_ties_and_noncontiguous(isa):
    w = torch.tensor([[127.0] + [k + 0.5 for k in range(-60, 60)] + [0.0] * 7])  # scale 1: exact halves
    w = torch.cat([w, -w]).T.contiguous().T  # column-major
    assert not w.is_contiguous()
    q, s = ops.quantize_q8(w)
    qr, sr = q8.quantize_q8_reference(w)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def _check(x, q, s, bias):
    y = torch.ops.pyshrink.linear_q8(x, q, s, bias)
    N, K = q.shape
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    y_ref = q8.linear_q8_reference(x, q, s, bias).double().reshape(-1, N)
    bound = exact_bound(x.reshape(-1, K).double(), q.double() * s.double()[:, None], K + 12, bias, x.dtype)
    err = (y.double().reshape(-1, N) - y_ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3e}, worst ratio {(err / bound).max().item():.2f}"
    return y


@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(gen, M, K, N, dtype):
    q, s = ops.quantize_q8(torch.randn(N, K, generator=gen))
    bias = torch.randn(N, generator=gen) if M % 2 else None
    _check(torch.randn(M, K, generator=gen).to(dtype), q, s, bias)


@pytest.mark.parametrize("M", [1, 2, 5])
def test_linear_scalar_and_avx2_paths(isa, gen, M):
    q, s = ops.quantize_q8(torch.randn(33, 576, generator=gen))
    _check(torch.randn(M, 576, generator=gen), q, s, torch.randn(33, generator=gen).bfloat16())


def test_linear_noncontiguous(gen):
    q, s = ops.quantize_q8(torch.randn(33, 200, generator=gen))
    for x in (torch.randn(200, 5, generator=gen).T, torch.randn(2, 200, 3, generator=gen).permute(2, 0, 1).half()):
        assert not x.is_contiguous()
        y = _check(x, q, s, None)
        assert torch.equal(y, torch.ops.pyshrink.linear_q8(x.contiguous(), q, s, None))


def test_opcheck(gen):
    w = torch.randn(9, 100, generator=gen)
    torch.library.opcheck(torch.ops.pyshrink.quantize_q8.default, (w,))
    q, s = ops.quantize_q8(w)
    torch.library.opcheck(torch.ops.pyshrink.linear_q8.default, (torch.randn(3, 100), q, s, torch.randn(9)))
    torch.library.opcheck(torch.ops.pyshrink.linear_q8.default, (torch.randn(100), q, s, None))


def test_errors():
    q, s = ops.quantize_q8(torch.randn(8, 100))
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match=r"pyshrink.quantize_q8: w must be 2-D"):
        ops.quantize_q8(torch.randn(100))
    with pytest.raises(ValueError, match=r"pyshrink.linear_q8: q must be int8 \[N, K\]"):
        ops.linear_q8(x, q.to(torch.uint8), s)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q8: x must be \[..., K\] with K=100"):
        ops.linear_q8(torch.randn(2, 99), q, s)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q8: x is on meta but the weights are on cpu"):
        ops.linear_q8(x.to("meta"), q, s)
    op = torch.ops.pyshrink
    with pytest.raises(RuntimeError, match=r"pyshrink.quantize_q8: w must be float32, float16 or bfloat16, got Double"):
        op.quantize_q8(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q8: x must be \[..., K\] with K=100 matching the weights, got shape \[2, 99\]"):
        op.linear_q8(torch.randn(2, 99), q, s, None)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q8: scales must be float32 \[8\], got Float \[7\]"):
        op.linear_q8(x, q, s[:7], None)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q8: x must be float32, float16 or bfloat16, got Int"):
        op.linear_q8(x.int(), q, s, None)
