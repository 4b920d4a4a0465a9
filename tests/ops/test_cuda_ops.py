"""pyshrink's CUDA kernels against the float64 references. Skipped entirely without a CUDA device.

Error bounds are worst-case ones derived from how each path rounds (u = 2^-24, "mag" = sum_k |x_k w_k| +
|bias|, see tests/ops/_opsutil.py for the convention), not tolerances tuned to pass:

* linear_q4, tensor-core kernel (fp16/bf16, M below the dequant+cuBLAS threshold): x and (q - zp) enter
  the mma exactly, products are exact; the fp32 sums of a group (g terms; the tensor cores' fp32 adder may
  truncate, so 2u per add), the scale product, the nb-long group accumulation, the split-K reduction and the
  bias add round, plus one ulp of the output dtype:  (2g + nb + 16) u mag + ulp_out mag.
* linear_q4 at M >= PYSHRINK_Q4_DEQUANT_MATMUL_MIN_M, and float32 activations: weights dequantized into
  the activation dtype (half an ulp each), cuBLAS fp32 accumulation (which PyTorch lets run split-K
  reductions in the activation dtype: another ulp), output rounding:  (K + 16) u mag + 3 ulp_out mag.
* act_stats_: float32 sums of kChunk = 16 rows, then float64: |err| <= (16 + 2) u * sum|terms| per channel.
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

import pyshrink  # noqa: E402  (loads pyshrink._C: registers the CPU and CUDA kernels)
import pyshrink.ops as ops  # noqa: E402
from pyshrink import _C  # noqa: E402
from pyshrink.ops import act_stats, q4, q8  # noqa: E402
from _cudautil import kernel_names  # noqa: E402

U32 = 2.0 ** -24
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
ENV_MIN_M = "PYSHRINK_Q4_DEQUANT_MATMUL_MIN_M"
DEFAULT_MIN_M = 512  # kDefaultDequantMatmulMinM in csrc/cuda/ops_cuda.cpp
DEV = "cuda"

SHAPES = [(200, 7), (576, 33), (1000, 130)]  # (K, N): N not a multiple of 8 or 16, K not of the group size
MS = [1, 3, 8, 17, 128, 1024]
CUDA_OPS = ["act_stats_", "quantize_q4", "dequantize_q4", "linear_q4", "quantize_q8", "linear_q8"]


@pytest.fixture
def gen():
    return torch.Generator(device=DEV).manual_seed(1234)


@pytest.fixture
def kernel_path(monkeypatch):
    """Force the tensor-core kernel for every M (no dequantize + cuBLAS)."""
    monkeypatch.setenv(ENV_MIN_M, str(1 << 40))


@pytest.fixture
def cublas_path(monkeypatch):
    """Force dequantize + cuBLAS for every M."""
    monkeypatch.setenv(ENV_MIN_M, "1")


def _weights(gen, N, K, g, sym):
    w = torch.randn(N, K, generator=gen, device=DEV) * 0.05
    return q4.quantize_q4_reference(w, g, sym)  # the reference, so these tests don't lean on quantize_q4's kernel


def _mag(x2, w, bias):
    m = x2.double().abs() @ w.double().abs().T
    return m if bias is None else m + bias.double().abs()


def _check_linear_q4(x, packed, scales, zp, bias, path):
    N, nb, half = packed.shape
    g, K = 2 * half, x.shape[-1]
    y = torch.ops.pyshrink.linear_q4(x, packed, scales, zp, bias, False)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], N) and y.device == x.device and y.is_contiguous()
    # float64 x (exact from half precision) makes the reference's result float64: not rounded to x's dtype
    y_ref = q4.linear_q4_reference(x.double(), packed, scales, zp, bias, False).reshape(-1, N)
    w = q4.dequantize_q4_reference(packed, scales, zp, K)
    mag = _mag(x.reshape(-1, K), w, bias)
    if path == "kernel":
        bound = (2 * g + nb + 16) * U32 * mag + ULP[x.dtype] * mag
    else:
        bound = (K + 16) * U32 * mag + 3 * ULP[x.dtype] * mag
    err = (y.double().reshape(-1, N) - y_ref).abs()
    worst = (err / (bound + 1e-30)).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{path}: error {err.max().item():.3e} exceeds the bound by {worst:.2f}x"
    return y


# ------------------------------------------------------------------------------------------------------
# registration: the CUDA kernels are pyshrink's own and are the ones that run


def test_build_has_cuda():
    assert _C.build_info()["cuda"], "pyshrink._C was built without CUDA on a machine that has a GPU"


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_is_registered_from_ops_cuda(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyshrink::{op}", "CUDA")
    dump = torch._C._dispatch_dump(f"pyshrink::{op}")
    cuda = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    assert len(cuda) == 1 and "csrc/cuda/ops_cuda.cpp" in cuda[0].replace(os.sep, "/"), dump


def test_custom_kernels_run(gen, monkeypatch):
    packed, scales, zp = _weights(gen, 256, 512, 64, False)
    x = torch.randn(4, 512, generator=gen, device=DEV, dtype=torch.float16)
    names = kernel_names(lambda: ops.linear_q4(x, packed, scales, zp))
    assert any("linear_q4_mma_kernel" in n for n in names), names
    monkeypatch.setenv(ENV_MIN_M, "1")
    names = kernel_names(lambda: ops.linear_q4(x, packed, scales, zp))
    assert any("dequantize_q4_kernel" in n for n in names), names
    assert not any("linear_q4_mma_kernel" in n for n in names), names
    acc, cnt = ops.new_accumulators(512, device=DEV)
    names = kernel_names(lambda: ops.act_stats_(x, acc, cnt))
    assert any("act_stats_kernel" in n for n in names), names


# ------------------------------------------------------------------------------------------------------
# linear_q4


LINEAR_CASES = [(dtype, g, sym, KN, M) for dtype in (torch.float16, torch.bfloat16) for g in q4.GROUP_SIZES
                for sym in (True, False) for KN in SHAPES for M in MS]


@pytest.mark.parametrize("dtype,g,sym,KN,M", LINEAR_CASES,
                         ids=[f"{str(c[0])[6:]}-g{c[1]}-{'sym' if c[2] else 'asym'}-K{c[3][0]}-N{c[3][1]}-M{c[4]}"
                              for c in LINEAR_CASES])
def test_linear_q4_kernel_matches_reference(kernel_path, gen, dtype, g, sym, KN, M):
    K, N = KN
    packed, scales, zp = _weights(gen, N, K, g, sym)
    x = torch.randn(M, K, generator=gen, device=DEV).to(dtype)
    bias = torch.randn(N, generator=gen, device=DEV) if (M + g) % 3 else None
    _check_linear_q4(x, packed, scales, zp, bias, "kernel")


@pytest.mark.parametrize("M", [1, 17, 511, 512, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_q4_default_dispatch(gen, monkeypatch, M, dtype):
    monkeypatch.delenv(ENV_MIN_M, raising=False)
    K, N = 576, 130
    packed, scales, zp = _weights(gen, N, K, 32, False)
    x = torch.randn(M, K, generator=gen, device=DEV).to(dtype)
    _check_linear_q4(x, packed, scales, zp, torch.randn(N, generator=gen, device=DEV),
                     "kernel" if M < DEFAULT_MIN_M else "cublas")


@pytest.mark.parametrize("M", [1, 33, 1024])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_q4_dequant_matmul_path(cublas_path, gen, M, dtype):
    K, N = 1000, 130
    packed, scales, zp = _weights(gen, N, K, 64, True)
    x = torch.randn(M, K, generator=gen, device=DEV).to(dtype)
    _check_linear_q4(x, packed, scales, zp, torch.randn(N, generator=gen, device=DEV).to(dtype), "cublas")


@pytest.mark.parametrize("M", [1, 40])
def test_linear_q4_float32_activations(gen, M):
    """float32 x runs dequantize (float32) + cuBLAS: TF32 stays off, as PyTorch's default."""
    assert not torch.backends.cuda.matmul.allow_tf32
    packed, scales, zp = _weights(gen, 33, 576, 128, False)
    x = torch.randn(M, 576, generator=gen, device=DEV)
    _check_linear_q4(x, packed, scales, zp, torch.randn(33, generator=gen, device=DEV), "cublas")


@pytest.mark.parametrize("M", [1, 5, 12, 40])
@pytest.mark.parametrize("K", [99, 130, 250])
def test_linear_q4_unaligned_k(kernel_path, gen, K, M):
    """K % 8 != 0: x rows are not 16-byte aligned, so the kernel loads x without cp.async."""
    for g, sym in ((32, False), (128, True)):
        packed, scales, zp = _weights(gen, 20, K, g, sym)
        x = torch.randn(M, K, generator=gen, device=DEV).half()
        _check_linear_q4(x, packed, scales, zp, None, "kernel")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_q4_strided_batched_and_misaligned_inputs(kernel_path, gen, dtype):
    K, N = 576, 33
    packed, scales, zp = _weights(gen, N, K, 64, False)
    xs = torch.randn(5, K + 40, generator=gen, device=DEV).to(dtype)[:, 8:K + 8]  # row stride K+40
    xt = torch.randn(K, 6, generator=gen, device=DEV).to(dtype).T  # column stride 6
    xb = torch.randn(2, 3, K, generator=gen, device=DEV).to(dtype)  # batched
    xo = torch.randn(3 * K + 1, generator=gen, device=DEV).to(dtype)[1:].view(3, K)  # 2-byte misaligned
    for x in (xs, xt, xb, xo):
        y = _check_linear_q4(x, packed, scales, zp, None, "kernel")
        assert torch.equal(y, torch.ops.pyshrink.linear_q4(x.contiguous(), packed, scales, zp, None, False))
    # weights at odd offsets in their storage: the binding copies them to aligned memory
    p_off = torch.empty(packed.numel() + 3, dtype=torch.uint8, device=DEV)[3:].view(packed.shape)
    p_off.copy_(packed)
    z_off = torch.empty(zp.numel() + 1, dtype=torch.uint8, device=DEV)[1:].view(zp.shape)
    z_off.copy_(zp)
    x = torch.randn(3, K, generator=gen, device=DEV).to(dtype)
    assert torch.equal(torch.ops.pyshrink.linear_q4(x, p_off, scales, z_off, None, False),
                       torch.ops.pyshrink.linear_q4(x, packed, scales, zp, None, False))


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_linear_q4_bias_dtypes(kernel_path, gen, bias_dtype):
    packed, scales, zp = _weights(gen, 130, 200, 32, True)
    x = torch.randn(3, 200, generator=gen, device=DEV).half()
    _check_linear_q4(x, packed, scales, zp, torch.randn(130, generator=gen, device=DEV).to(bias_dtype), "kernel")


def test_linear_q4_fast_is_exact_on_cuda(gen):
    packed, scales, zp = _weights(gen, 33, 576, 64, False)
    for M in (1, 17, 1024):
        x = torch.randn(M, 576, generator=gen, device=DEV).bfloat16()
        assert torch.equal(ops.linear_q4(x, packed, scales, zp, fast=True), ops.linear_q4(x, packed, scales, zp))


def test_linear_q4_large_shape(kernel_path, gen):
    """A model-sized layer (many k-tiles, every block of the grid busy) against a float32 GEMM."""
    K, N = 4096, 1536
    packed, scales, zp = _weights(gen, N, K, 128, True)
    w = q4.dequantize_q4_reference(packed, scales, zp, K)
    for M in (1, 16, 200):
        x = torch.randn(M, K, generator=gen, device=DEV).half()
        y = ops.linear_q4(x, packed, scales, zp)
        ref = (x.double() @ w.double().T)
        mag = _mag(x, w, None)
        assert ((y.double() - ref).abs() <= (2 * 128 + 32 + 16) * U32 * mag + ULP[x.dtype] * mag).all()


def test_linear_q4_side_stream_and_empty(gen):
    packed, scales, zp = _weights(gen, 33, 200, 32, True)
    x = torch.randn(4, 200, generator=gen, device=DEV).half()
    expect = ops.linear_q4(x, packed, scales, zp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = ops.linear_q4(x, packed, scales, zp)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y, expect)
    assert ops.linear_q4(x[:0], packed, scales, zp).shape == (0, 33)
    assert ops.linear_q4(torch.empty(2, 0, 200, device=DEV).half(), packed, scales, zp).shape == (2, 0, 33)


# ------------------------------------------------------------------------------------------------------
# act_stats_


def _check_act_stats(x, calls=1):
    C = x.shape[-1]
    acc, cnt = ops.new_accumulators(C, device=x.device)
    acc_ref, cnt_ref = ops.new_accumulators(C, device=x.device)
    for _ in range(calls):
        torch.ops.pyshrink.act_stats_(x, acc, cnt)
        act_stats.act_stats_reference(x, acc_ref, cnt_ref)
    assert torch.equal(cnt, cnt_ref)
    mag = torch.stack([acc_ref[0], acc_ref[0], acc_ref[2]])  # sum of |terms| of each statistic
    bound = (16 + 2) * U32 * mag + 1e-300
    err = (acc - acc_ref).abs()
    assert (err <= bound).all(), f"act_stats_ error {(err / bound).max().item():.2f}x the bound"
    return acc, cnt


@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (3, 130), (1000, 1000), (2, 64, 576), (4097, 12), (300, 4104),
                                   (70000, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_act_stats_matches_reference(gen, shape, dtype):
    x = (torch.randn(*shape, generator=gen, device=DEV) * 3 + 0.5).to(dtype)
    _check_act_stats(x, calls=2)  # accumulates in place across calls


def test_act_stats_strided_and_odd_inputs(gen):
    base = torch.randn(6, 50, 136, generator=gen, device=DEV)
    flat = torch.randn(300, 136, generator=gen, device=DEV)
    cases = [
        flat[:, :130],  # row stride 136, C = 130: float32 vectors of 2
        flat.bfloat16()[:, 8:136],  # bf16, row stride 136, rows 16-byte aligned: vectors of 8
        flat.half()[:, 1:129],  # 2-byte misaligned start: scalar loads
        base[:, :, :128],  # 3-D slice whose leading dims merge: row stride 136 without a copy
        base.permute(1, 0, 2),  # leading dims don't merge -> copy
        base.transpose(1, 2),  # channel stride 136 -> copy
        torch.randn(1, 96, generator=gen, device=DEV).half().expand(300, 96),  # row stride 0 (broadcast)
        torch.randn(33, generator=gen, device=DEV),  # 1-D: one token
    ]
    for x in cases:
        _check_act_stats(x)


def test_act_stats_empty_and_zero_channels():
    acc, cnt = _check_act_stats(torch.empty(0, 5, device=DEV))
    assert cnt.item() == 0 and (acc == 0).all()
    acc, cnt = ops.new_accumulators(0, device=DEV)
    torch.ops.pyshrink.act_stats_(torch.empty(7, 0, device=DEV), acc, cnt)
    assert cnt.item() == 7


# ------------------------------------------------------------------------------------------------------
# quantizers, dequantize_q4, q8: equal to the references (same math in ATen, or exact by construction)


@pytest.mark.parametrize("g", q4.GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_and_dequantize_q4_equal_reference(gen, g, sym, dtype):
    w = (torch.randn(33, 1000, generator=gen, device=DEV) * 0.1).to(dtype)
    w[3] = 0  # zero groups: scale 0
    w[5, :g] = torch.linspace(-1, 1, g, device=DEV).to(dtype)  # ties in |w|
    got = ops.quantize_q4(w, g, sym)
    ref = q4.quantize_q4_reference(w, g, sym)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    assert torch.equal(ops.dequantize_q4(*got, 1000), q4.dequantize_q4_reference(*ref, 1000))


def test_quantize_and_linear_q8(gen):
    w = torch.randn(130, 576, generator=gen, device=DEV) * 0.1
    qw, s = ops.quantize_q8(w)
    qr, sr = q8.quantize_q8_reference(w)
    assert torch.equal(qw, qr) and torch.equal(s, sr)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(5, 576, generator=gen, device=DEV).to(dtype)
        bias = torch.randn(130, generator=gen, device=DEV)
        y = ops.linear_q8(x, qw, s, bias)
        y_ref = q8.linear_q8_reference(x, qw, s, bias).double()
        mag = _mag(x, qw.double() * s.double()[:, None], bias)
        bound = (576 + 16) * U32 * mag + 3 * ULP[dtype] * mag
        assert y.dtype == dtype and ((y.double() - y_ref).abs() <= bound).all()


# ------------------------------------------------------------------------------------------------------
# opcheck on CUDA tensors


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_opcheck_linear_q4(gen, sym, dtype):
    packed, scales, zp = _weights(gen, 9, 100, 32, sym)
    x = torch.randn(3, 100, generator=gen, device=DEV).to(dtype)
    op = torch.ops.pyshrink.linear_q4.default
    torch.library.opcheck(op, (x, packed, scales, zp, torch.randn(9, device=DEV), False))
    torch.library.opcheck(op, (x[0], packed, scales, zp, None, True))


def test_opcheck_other_ops(gen):
    x = torch.randn(3, 5, 40, generator=gen, device=DEV).bfloat16()
    acc, cnt = ops.new_accumulators(40, device=DEV)
    torch.library.opcheck(torch.ops.pyshrink.act_stats_.default, (x, acc, cnt))
    w = torch.randn(9, 100, generator=gen, device=DEV)
    torch.library.opcheck(torch.ops.pyshrink.quantize_q4.default, (w, 32, False))
    packed, scales, zp = ops.quantize_q4(w, 32, False)
    torch.library.opcheck(torch.ops.pyshrink.dequantize_q4.default, (packed, scales, zp, 100))
    torch.library.opcheck(torch.ops.pyshrink.quantize_q8.default, (w,))
    qw, s = ops.quantize_q8(w)
    torch.library.opcheck(torch.ops.pyshrink.linear_q8.default, (torch.randn(5, 100, device=DEV).bfloat16(), qw, s, None))


# ------------------------------------------------------------------------------------------------------
# bad inputs reach the C++ checks (the op called directly, bypassing the Python wrappers)


def test_linear_q4_kernel_errors(gen):
    packed, scales, zp = _weights(gen, 8, 100, 32, False)
    x = torch.randn(2, 100, device=DEV).half()
    op = torch.ops.pyshrink.linear_q4
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: x must be float32, float16 or bfloat16, got Int"):
        op(torch.zeros(2, 100, dtype=torch.int32, device=DEV), packed, scales, zp, None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: x must be float32, float16 or bfloat16, got Double"):
        op(x.double(), packed, scales, zp, None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: x is on cpu but the weights are on cuda"):
        op(x.cpu(), packed, scales, zp, None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: bias is on cpu but the weights are on cuda"):
        op(x, packed, scales, zp, torch.randn(8), False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: packed, scales and zero_points must share a device"):
        op(x, packed, scales.cpu(), zp, None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: group size 48"):
        op(torch.randn(2, 96, device=DEV).half(), torch.zeros(8, 2, 24, dtype=torch.uint8, device=DEV),
           torch.zeros(8, 2, device=DEV), torch.empty(0, dtype=torch.uint8, device=DEV), None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: K=96 needs 3 blocks of 32, but the weights have 4"):
        op(torch.randn(2, 96, device=DEV).half(), packed, scales, zp, None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: zero_points must be empty \(symmetric\) or \[8, 2\]"):
        op(x, packed, scales, zp[:, :1], None, False)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.linear_q4: bias must be \[8\], got \[3\]"):
        op(x, packed, scales, zp, torch.randn(3, device=DEV), False)
    with pytest.raises(ValueError, match=r"^pyshrink\.linear_q4: x is on cpu but the weights are on cuda"):
        ops.linear_q4(x.cpu(), packed, scales, zp)  # the Python wrapper says the same first


def test_act_stats_kernel_errors():
    x = torch.randn(4, 8, device=DEV)
    acc, cnt = ops.new_accumulators(8, device=DEV)
    op = torch.ops.pyshrink.act_stats_
    with pytest.raises(RuntimeError, match=r"^pyshrink\.act_stats_: x, acc and count must be on one CUDA device"):
        op(x, acc.cpu(), cnt)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.act_stats_: acc must be float64 of shape \(3, 8\)"):
        op(x, acc.float(), cnt)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.act_stats_: x must be float32, float16 or bfloat16, got Int"):
        op(x.int(), acc, cnt)
    with pytest.raises(RuntimeError, match=r"^pyshrink\.act_stats_: count must be float64 of shape \(1,\)"):
        op(x, acc, cnt.float())
