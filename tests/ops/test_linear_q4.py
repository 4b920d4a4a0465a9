"""linear_q4: native kernels (exact and fast modes, every CPU code path) against the float64 references.

Bounds (see _opsutil.py for the derivation): exact mode against the float64 product with the dequantized
weights, |y - y_ref| <= (min(Kp, 1024) + nb + 12) * 2^-24 * sum_k |x_k| w'_k + one output ulp, w'_k = |w_k|
(+ |(zp - 8) * scale| for asymmetric weights on the AVX-512 GEMV, M <= 3, which corrects the zero point per
output); fast mode
against linear_q4_reference(fast=True), |y - y_ref| <= (2 nb + 16) * 2^-24 * T + one output ulp.
"""
import itertools

import pytest
import torch

import pyshrink.ops as ops
from pyshrink.ops import q4

from _opsutil import q4_exact_bound, q4_fast_bound

SHAPES = [(200, 7), (576, 33), (1000, 130)]  # (K, N): neither a multiple of 8 nor of the group size
MS = [1, 3, 17, 128]


def _weights(gen, N, K, g, sym):
    w = torch.randn(N, K, generator=gen) * 0.05
    return ops.quantize_q4(w, g, sym)


def _check(x, packed, scales, zp, bias, fast):
    y = torch.ops.pyshrink.linear_q4(x, packed, scales, zp, bias, fast)
    K = x.shape[-1]
    N = packed.shape[0]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N)
    y_ref = q4.linear_q4_reference(x, packed, scales, zp, bias, fast).double().reshape(-1, N)
    x2 = x.reshape(-1, K)
    bound = (q4_fast_bound if fast else q4_exact_bound)(x2, packed, scales, zp, bias, x.dtype)
    err = (y.double().reshape(-1, N) - y_ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3e} exceeds the bound by {worst:.2f}x"
    return y


# every group size x symmetry x mode x M, with the shape, dtype and bias cycled through the combinations
CASES = [
    (g, sym, fast, M, SHAPES[i % 3], [torch.float32, torch.bfloat16][i % 2], bool(i // 2 % 2))
    for i, (g, sym, fast, M) in enumerate(itertools.product(q4.GROUP_SIZES, [True, False], [False, True], MS))
]


@pytest.mark.parametrize("g,sym,fast,M,KN,dtype,with_bias", CASES,
                         ids=[f"g{c[0]}-{'sym' if c[1] else 'asym'}-{'fast' if c[2] else 'exact'}-M{c[3]}-K{c[4][0]}"
                              f"-N{c[4][1]}-{str(c[5])[6:]}{'-bias' if c[6] else ''}" for c in CASES])
def test_matches_reference(isa, gen, g, sym, fast, M, KN, dtype, with_bias):
    K, N = KN
    packed, scales, zp = _weights(gen, N, K, g, sym)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen) if with_bias else None
    _check(x, packed, scales, zp, bias, fast)


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 12, 17])
@pytest.mark.parametrize("g,sym", [(32, False), (64, True), (128, False)])
def test_every_path_and_row_tail(isa, gen, fast, M, g, sym):
    """Every code path and M-specific kernel (M = 1, 2, 3 direct; >= 4 tiled, with every row-tile tail),
    N = 33 and 100 (not a multiple of any weight-row tile), against the reference."""
    K, N = 576, 33 if M % 2 else 100
    packed, scales, zp = _weights(gen, N, K, g, sym)
    x = torch.randn(M, K, generator=gen)
    _check(x, packed, scales, zp, torch.randn(N, generator=gen), fast)


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("K,g,sym", [(2080, 32, False), (2080, 32, True), (576, 64, False), (1000, 64, False),
                                     (1024, 128, True), (1024, 64, False)])
def test_gemv_long_rows_and_partial_chunks(isa, gen, fast, M, K, g, sym):
    """The M <= 3 GEMVs: rows over 1 KiB (2080 weights at g=32 are 1,040 bytes; their prefetch runs ahead within
    the row, then into the next tile's rows), rows whose last 128-weight chunk is partial (576, 1000), and
    float32 rows of whole chunks (1024), which the activation layout reads straight from x without a copy."""
    N = 37
    packed, scales, zp = _weights(gen, N, K, g, sym)
    _check(torch.randn(M, K, generator=gen), packed, scales, zp, torch.randn(N, generator=gen), fast)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M", [1, 37])
@pytest.mark.parametrize("K,g,sym", [(4096, 64, True), (4000, 64, False), (8192, 128, False)])
def test_fast_gemm_cache_blocks(isa, gen, threads, M, K, g, sym):
    """fast mode with M >= 4 walks panels of weight tiles against chunks of x's rows (64 KB of codes: 16 rows at
    K = 4096, 8 at 8192) so that both stay in L2: M = 37 spans several chunks and ends in a partial row group,
    N = 151 several panels of 2-row tiles whose last one repeats a row; K = 4000 is padded to whole blocks. One
    thread walks all of them in one task. M = 1 at the scalar level walks the same panels (4-row tiles)."""
    N = 151
    packed, scales, zp = _weights(gen, N, K, g, sym)
    with ops.kernel_threads(threads):
        _check(torch.randn(M, K, generator=gen), packed, scales, zp, torch.randn(N, generator=gen), True)


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_noncontiguous_and_batched_inputs(isa, gen, fast):
    K, N = 200, 33
    packed, scales, zp = _weights(gen, N, K, 64, False)
    xt = torch.randn(K, 5, generator=gen).T  # [5, K], column stride 5
    xs = torch.randn(3, 2 * K, generator=gen)[:, ::2]  # sliced: column stride 2
    xb = torch.randn(2, K, 4, generator=gen).permute(0, 2, 1)  # [2, 4, K] batched, non-contiguous
    for x in (xt, xs, xb, xb.to(torch.bfloat16)):
        assert not x.is_contiguous()
        y = _check(x, packed, scales, zp, None, fast)
        assert torch.equal(y, torch.ops.pyshrink.linear_q4(x.contiguous(), packed, scales, zp, None, fast))


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_float16_activations_and_bias_dtypes(isa, gen, fast):
    K, N = 576, 130
    packed, scales, zp = _weights(gen, N, K, 32, True)
    x = torch.randn(17, K, generator=gen).half()
    _check(x, packed, scales, zp, torch.randn(N, generator=gen).half(), fast)
    _check(x.bfloat16(), packed, scales, zp, torch.randn(N, generator=gen).bfloat16(), fast)


@pytest.mark.parametrize("M", [1, 3, 4])  # M <= 3 quantizes into the GEMV layout, M >= 4 into the GEMM's
def test_fast_mode_activation_ties(isa, M):
    """x / sx landing exactly on k + 0.5 must round like the reference (half to even), else one activation
    code differs and the error is a whole sx * scale * (q - zp), far above the bound."""
    K, N, g = 256, 16, 64
    gen = torch.Generator().manual_seed(7)
    packed, scales, zp = _weights(gen, N, K, g, False)
    x = torch.randint(-253, 254, (M, K), generator=gen).float() / 2  # halves
    x[:, ::g] = 127.0  # max |x| = 127 in every block -> sx = 1, x / sx = the halves themselves
    _check(x, packed, scales, zp, None, True)


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_fast_mode_all_zero_activation_blocks(isa, gen, M, sym):
    """A block of x that is all zeros has sx = 0 and must contribute nothing (no 0 / 0), in any position,
    the partial last block included."""
    K, N, g = 200, 9, 32
    packed, scales, zp = _weights(gen, N, K, g, sym)
    x = torch.randn(M, K, generator=gen)
    x[:, g:2 * g] = 0
    x[:, 6 * g:] = 0  # the last, partial block (200 = 6 * 32 + 8)
    _check(x, packed, scales, zp, None, True)


@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("g", q4.GROUP_SIZES)
def test_fast_mode_extreme_codes_do_not_saturate(isa, M, g):
    """Every code 15 against activation codes of +127: the largest int16 partial sums the integer dots build
    (the M = 1 AVX2 GEMV folds two int16 lanes of a block together, up to 30,480 at g = 128). A step that wrapped
    or saturated would change the sum by thousands."""
    K, N = 16 * g + g // 2, 7  # 16 whole blocks (4 steps of the 4-block GEMV loop) and a partial one
    packed = torch.full((N, -(-K // g), g // 2), 0xFF, dtype=torch.uint8)
    scales = torch.ones(N, packed.shape[1])
    x = torch.full((M, K), 127.0)
    y = _check(x, packed, scales, torch.empty(0, dtype=torch.uint8), None, True)
    assert torch.equal(y, torch.full((M, N), 7.0 * 127 * K))  # (15 - 8) * 127 per weight, exact in float32


def test_zero_rows_and_zero_weights(gen):
    K, N = 200, 7
    packed, scales, zp = ops.quantize_q4(torch.zeros(N, K), 32, False)
    x = torch.randn(3, K, generator=gen)
    x[1] = 0
    for fast in (False, True):
        assert torch.equal(ops.linear_q4(x, packed, scales, zp, fast=fast), torch.zeros(3, N))
    packed, scales, zp = _weights(gen, N, K, 32, True)
    bias = torch.randn(N, generator=gen)
    for fast in (False, True):
        y = ops.linear_q4(torch.zeros(2, K), packed, scales, zp, bias, fast=fast)
        assert torch.equal(y, bias.expand(2, N))
        assert ops.linear_q4(torch.zeros(0, K), packed, scales, zp, fast=fast).shape == (0, N)


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_nan_activations_give_nan_rows(isa, gen, fast, M, sym):
    """A NaN in a row of x makes that row's outputs NaN, as in the reference, wherever it sits in its block (a
    vector max drops a NaN unless the quantizer checks for one), and leaves the other rows finite."""
    K, N, g = 200, 9, 64
    packed, scales, zp = _weights(gen, N, K, g, sym)
    x = torch.randn(M, K, generator=gen)
    for pos in (0, 5, 63, 130, 199):  # a block's first and last element, the middle, the partial last block
        xn = x.clone()
        xn[0, pos] = float("nan")
        y = torch.ops.pyshrink.linear_q4(xn, packed, scales, zp, None, fast)
        assert torch.isnan(q4.linear_q4_reference(xn, packed, scales, zp, None, fast)[0]).all()
        assert torch.isnan(y[0]).all(), f"NaN at {pos}: outputs {y[0]}"
        assert torch.isfinite(y[1:]).all()


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_opcheck(gen, fast, sym):
    packed, scales, zp = _weights(gen, 9, 100, 32, sym)
    x = torch.randn(3, 100, generator=gen)
    torch.library.opcheck(torch.ops.pyshrink.linear_q4.default, (x, packed, scales, zp, torch.randn(9), fast))
    torch.library.opcheck(torch.ops.pyshrink.linear_q4.default, (x[0], packed, scales, zp, None, fast))


def test_wrapper_errors(gen):
    packed, scales, zp = _weights(gen, 8, 100, 32, True)
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: K=160 needs 5 blocks of 32, but the weights have 4"):
        ops.linear_q4(torch.randn(2, 96 + 64), packed, scales, zp)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: x must be float32, float16 or bfloat16, got torch.float64"):
        ops.linear_q4(x.double(), packed, scales, zp)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: bias must be \[8\], got \(7,\)"):
        ops.linear_q4(x, packed, scales, zp, torch.randn(7))
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: x is on meta but the weights are on cpu"):
        ops.linear_q4(x.to("meta"), packed, scales, zp)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: group size 40"):
        ops.linear_q4(x, torch.zeros(8, 3, 20, dtype=torch.uint8), torch.zeros(8, 3), zp)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: scales must be float32 \[8, 4\]"):
        ops.linear_q4(x, packed, scales.half(), zp)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: x must be \[..., K\], got a 0-d tensor"):
        ops.linear_q4(torch.tensor(1.0), packed, scales, zp)
    # K is not in the packed layout: a width within the last group passes unless the weights' K is given
    assert ops.linear_q4(torch.randn(2, 97), packed, scales, zp).shape == (2, 8)
    with pytest.raises(ValueError, match=r"pyshrink.linear_q4: x must be \[..., K\] with K=100 matching the weights, "
                                         r"got shape \(2, 97\)"):
        ops.linear_q4(torch.randn(2, 97), packed, scales, zp, in_features=100)
    torch.testing.assert_close(ops.linear_q4(x, packed, scales, zp, in_features=100), ops.linear_q4(x, packed, scales, zp))


def test_kernel_errors(gen):
    packed, scales, zp = _weights(gen, 8, 100, 32, False)
    x = torch.randn(2, 100)
    op = torch.ops.pyshrink.linear_q4
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q4: x has K=96, which needs 3 blocks of 32, but the weights have 4"):
        op(torch.randn(2, 96), packed, scales, zp, None, False)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q4: x must be float32, float16 or bfloat16, got Double"):
        op(x.double(), packed, scales, zp, None, True)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q4: scales must be float32 \[8, 4\], got Double"):
        op(x, packed, scales.double(), zp, None, False)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q4: packed must be uint8 \[N, nb, g/2\], got Char"):
        op(x, packed.view(torch.int8), scales, zp, None, False)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q4: zero_points must be empty \(symmetric\) or \[8, 2\]"):
        op(x, packed, scales, zp[:, :1], None, False)
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q4: bias must be \[8\], got \[3\]"):
        op(x, packed, scales, zp, torch.randn(3), False)


def test_meta_tensors_use_the_fake(gen):
    packed, scales, zp = (t.to("meta") for t in _weights(gen, 8, 100, 32, False))
    y = ops.linear_q4(torch.empty(2, 5, 100, device="meta", dtype=torch.bfloat16), packed, scales, zp, fast=True)
    assert y.device.type == "meta" and y.shape == (2, 5, 8) and y.dtype == torch.bfloat16
