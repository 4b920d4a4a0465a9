"""Error bounds used by the op tests (shared by test_linear_q4.py, test_q8.py and test_native.py).

Every bound is a worst-case one, derived from how the kernels round, not a tolerance tuned to pass:
float32 recursive summation of n terms is within gamma_n ~ n*u of the exact sum, relative to the sum of
absolute values (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1), u = 2^-24. The result's
rounding to the output dtype adds at most one ulp of that dtype.
"""
import torch

from pyshrink.ops import q4

U32 = 2.0 ** -24  # unit roundoff of float32
ULP_OUT = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}  # relative ulp


def _bias_abs(bias, N):
    return torch.zeros(N, dtype=torch.float64) if bias is None else bias.double().abs()


def exact_bound(x, w, n_terms, bias, out_dtype):
    """|y_hat - y| <= n * u * sum_k |x_k w_k| + one output ulp, for x [M, K], w [N, K] (float64 values)."""
    mag = x.abs().double() @ w.abs().double().T + _bias_abs(bias, w.shape[0])
    return n_terms * U32 * mag + ULP_OUT[out_dtype] * mag


def q4_exact_bound(x2, packed, scales, zero_points, bias, out_dtype):
    """Exact mode. The longest chain of float32 roundings a product goes through: the scalar path's block
    sum (g) or the GEMM path's K-chunk sum (<= 1024), the nb-long accumulation of blocks or chunks, and a
    few more for horizontal sums, the bias and the reference's own rounding of the dequantized weight.
    Asymmetric weights on the AVX-512 GEMV (cpu_isa avx512, M <= 3): it multiplies by (q - 8) * scale and
    subtracts (zp - 8) * scale * (sum of the block's x) per output, so the magnitudes it rounds are those of
    |x| (|w| + |(zp - 8) * scale|); every other path rounds |x| |w| only."""
    from pyshrink import _C

    N, nb, half = packed.shape
    K = x2.shape[-1]
    w = q4.dequantize_q4_reference(packed, scales, zero_points, K).double().abs()
    if zero_points.numel() and _C.cpu_isa() == "avx512" and x2.shape[0] <= 3:
        zp = q4.unpack_zero_points(zero_points, nb).double()
        w = w + (scales.double() * (zp - 8)).abs().repeat_interleave(2 * half, dim=1)[:, :K]
    return exact_bound(x2.double(), w, min(nb * 2 * half, 1024) + nb + 12, bias, out_dtype)


def q4_fast_bound(x2, packed, scales, zero_points, bias, out_dtype):
    """Fast mode. Per-block integer dots are exact, and the activation codes equal the reference's (same
    IEEE division and rounding), so only the float32 combination of blocks rounds: each term
    fl(sx*scale)*dot and each correction zp*scale*fl(sx*sum qx) carries 2-3 roundings and both are summed
    over nb blocks. Hence |y_hat - y_ref| <= (2*nb + 16) * u * T, T = sum_b |sx_b scale_b| sum_k |qx_k|(q_k + zp_b).
    """
    N, nb, half = packed.shape
    g = 2 * half
    K = x2.shape[-1]
    xp = torch.zeros(x2.shape[0], nb * g, dtype=torch.float32)
    xp[:, :K] = x2.float()
    qx, sx = q4._fast_quantize_activations(xp, g)
    qc = q4.unpack_codes(packed).double()
    zp = (q4.unpack_zero_points(zero_points, nb).double() if zero_points.numel()
          else torch.full((N, nb), 8.0, dtype=torch.float64))
    mags = torch.einsum("mbk,nbk->mnb", qx.double().abs(), qc + zp[..., None])
    T = (mags * (sx.double()[:, None, :] * scales.double()[None]).abs()).sum(-1) + _bias_abs(bias, N)
    return (2 * nb + 16) * U32 * T + ULP_OUT[out_dtype] * T
