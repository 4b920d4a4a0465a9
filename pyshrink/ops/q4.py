"""4-bit group quantization in ONNX Runtime's MatMulNBits layout, and the packed 4-bit linear.

Canonical (stored, exported byte-for-byte) layout for ``W [N, K]`` and group size ``g`` in {32, 64, 128}:

* ``packed``      uint8  ``[N, nb, g/2]`` with ``nb = ceil(K/g)``; byte ``j`` of a group holds element
  ``2j`` in its low nibble and ``2j+1`` in its high nibble. K is zero-padded up to ``nb*g``.
* ``scales``      float32 ``[N, nb]``.
* ``zero_points`` uint8  ``[N, ceil(nb/2)]`` (block ``2i`` in the low nibble of byte ``i``), or an empty
  ``[0]`` tensor for symmetric quantization, whose zero point is implicitly 8.

Dequantization: ``w[n, k] = (q[n, k] - zp[n, k // g]) * scales[n, k // g]``.

Quantization (exactly what the kernels compute, float32, round half to even):

* symmetric: ``m`` = the element of the group with the largest ``|w|`` (sign kept), ``scale = m / -8``
  (so the extreme lands exactly on code 0 and the full range -8..7 is used, as llama.cpp's Q4_0 and
  ONNX Runtime's quantizer do); ``q = clamp(round(w / scale) + 8, 0, 15)``; ``scale == 0`` gives ``q = 8``.
* asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``, ``scale = (hi - lo) / 15``,
  ``zp = clamp(round(-lo / scale), 0, 15)``, ``q = clamp(round(w / scale) + zp, 0, 15)``;
  ``scale == 0`` gives ``q = zp = 0`` (every element then dequantizes to 0).

Linear: ``y = x @ dequant(W)^T (+ bias)`` for ``x [..., K]``. Two modes:

* exact (``fast=False``): float activations, float32 accumulation.
* fast (``fast=True``): each row of ``x`` is quantized per K-block of ``g`` elements to int8,
  ``sx = max|x_blk| / 127``, ``qx = clamp(round(x / sx), -127, 127)`` (``sx == 0`` gives ``qx = 0``),
  and the block's contribution is ``sx * scale * sum(qx * (q - zp))`` with exact integer dot products
  (the technique of ONNX Runtime's accuracy_level 4 and llama.cpp's Q8_0 dot products). The CUDA
  kernel computes with tensor cores on float16/bfloat16 activations and treats ``fast`` as exact.
"""
from __future__ import annotations

import torch

from ._lib import check, define, reference

GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

QUANTIZE = define("quantize_q4(Tensor w, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)")
DEQUANTIZE = define("dequantize_q4(Tensor packed, Tensor scales, Tensor zero_points, int K) -> Tensor")
LINEAR = define(
    "linear_q4(Tensor x, Tensor packed, Tensor scales, Tensor zero_points, Tensor? bias, bool fast) -> Tensor"
)


def num_blocks(K: int, group_size: int) -> int:
    return -(-K // group_size)


# ----------------------------------------------------------------------------------------------------
# validation shared by the wrappers, fakes and references (kernels repeat the checks in C++)


def _check_weights(op: str, packed, scales, zero_points, K: int | None = None):
    check(packed.dtype == torch.uint8 and packed.dim() == 3, op,
          f"packed must be uint8 [N, nb, g/2], got {packed.dtype} {tuple(packed.shape)}")
    N, nb, half = packed.shape
    check(2 * half in GROUP_SIZES, op, f"group size {2 * half} (from packed.shape[2]) not in {GROUP_SIZES}")
    check(scales.dtype == torch.float32 and tuple(scales.shape) == (N, nb), op,
          f"scales must be float32 [{N}, {nb}], got {scales.dtype} {tuple(scales.shape)}")
    check(zero_points.dtype == torch.uint8, op, f"zero_points must be uint8, got {zero_points.dtype}")
    check(zero_points.numel() == 0 or tuple(zero_points.shape) == (N, (nb + 1) // 2), op,
          f"zero_points must be empty (symmetric) or [{N}, {(nb + 1) // 2}], got {tuple(zero_points.shape)}")
    if K is not None:
        check(num_blocks(K, 2 * half) == nb, op,
              f"K={K} needs {num_blocks(K, 2 * half)} blocks of {2 * half}, but the weights have {nb}")
    check(packed.device == scales.device == zero_points.device, op, "packed, scales and zero_points must share a device")


def _check_quantize(w, group_size):
    op = "quantize_q4"
    check(group_size in GROUP_SIZES, op, f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    check(w.dim() == 2, op, f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    check(w.dtype in FLOAT_DTYPES, op, f"w must be float32, float16 or bfloat16, got {w.dtype}")
    check(w.shape[0] > 0 and w.shape[1] > 0, op, f"w must be non-empty, got shape {tuple(w.shape)}")


def _check_linear(op, x, w_dev, K_w, bias, N):
    check(x.dim() >= 1 and x.shape[-1] == K_w, op,
          f"x must be [..., K] with K={K_w} matching the weights, got shape {tuple(x.shape)}")
    check(x.dtype in FLOAT_DTYPES, op, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    check(x.device == w_dev, op, f"x is on {x.device} but the weights are on {w_dev}")
    if bias is not None:
        check(tuple(bias.shape) == (N,), op, f"bias must be [{N}], got {tuple(bias.shape)}")
        check(bias.device == w_dev, op, f"bias is on {bias.device} but the weights are on {w_dev}")


# ----------------------------------------------------------------------------------------------------
# references (pure PyTorch; float64 where the math is a dot product)


@reference(QUANTIZE)
def quantize_q4_reference(w: torch.Tensor, group_size: int, symmetric: bool):
    N, K = w.shape
    nb = num_blocks(K, group_size)
    wp = torch.zeros(N, nb * group_size, dtype=torch.float32, device=w.device)
    wp[:, :K] = w.float()
    g = wp.view(N, nb, group_size)
    if symmetric:
        idx = g.abs().argmax(-1, keepdim=True)
        m = g.gather(-1, idx).squeeze(-1)
        scales = m / -8.0
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        q = torch.clamp(torch.round(g / safe[..., None]) + 8, 0, 15)
        q = torch.where(scales[..., None] == 0, torch.full_like(q, 8), q)
        zp = torch.empty(0, dtype=torch.uint8, device=w.device)
    else:
        lo = torch.clamp(g.amin(-1), max=0.0)
        hi = torch.clamp(g.amax(-1), min=0.0)
        scales = (hi - lo) / 15.0
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        zpf = torch.clamp(torch.round(-lo / safe), 0, 15)
        zpf = torch.where(scales == 0, torch.zeros_like(zpf), zpf)
        q = torch.clamp(torch.round(g / safe[..., None]) + zpf[..., None], 0, 15)
        q = torch.where(scales[..., None] == 0, torch.zeros_like(q), q)
        zp = pack_zero_points(zpf.to(torch.uint8))
    return pack_codes(q.to(torch.uint8)), scales.contiguous(), zp


@reference(DEQUANTIZE)
def dequantize_q4_reference(packed, scales, zero_points, K: int):
    q = unpack_codes(packed).float()  # [N, nb, g]
    N, nb, g = q.shape
    zp = unpack_zero_points(zero_points, nb).float() if zero_points.numel() else torch.full((N, nb), 8.0, device=q.device)
    w = (q - zp[..., None]) * scales[..., None]
    return w.reshape(N, nb * g)[:, :K].contiguous()


def _fast_quantize_activations(x2: torch.Tensor, g: int):
    """int8 block quantization of the activations, as the fast mode defines it. x2 [M, nb*g] float32."""
    M = x2.shape[0]
    xb = x2.view(M, -1, g)
    sx = xb.abs().amax(-1) / 127.0
    safe = torch.where(sx == 0, torch.ones_like(sx), sx)
    qx = torch.clamp(torch.round(xb / safe[..., None]), -127, 127)
    qx = torch.where(sx[..., None] == 0, torch.zeros_like(qx), qx)
    return qx, sx


@reference(LINEAR)
def linear_q4_reference(x, packed, scales, zero_points, bias, fast: bool):
    N, nb, half = packed.shape
    g = 2 * half
    K = x.shape[-1]
    x2 = x.reshape(-1, K).float()
    if not fast:
        w = dequantize_q4_reference(packed, scales, zero_points, K).double()
        y = x2.double() @ w.T
    else:
        xp = torch.zeros(x2.shape[0], nb * g, dtype=torch.float32, device=x.device)
        xp[:, :K] = x2
        qx, sx = _fast_quantize_activations(xp, g)
        q = unpack_codes(packed).double()
        zp = unpack_zero_points(zero_points, nb).double() if zero_points.numel() else torch.full((N, nb), 8.0, dtype=torch.float64, device=x.device)
        qw = q - zp[..., None]  # [N, nb, g]
        dots = torch.einsum("mbk,nbk->mnb", qx.double(), qw)  # exact integers in float64
        y = (dots * sx.double()[:, None, :] * scales.double()[None]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------------
# fakes


@torch.library.register_fake(QUANTIZE)
def _quantize_fake(w, group_size, symmetric):
    N, K = w.shape
    nb = num_blocks(K, group_size)
    packed = w.new_empty((N, nb, group_size // 2), dtype=torch.uint8)
    scales = w.new_empty((N, nb), dtype=torch.float32)
    zp = w.new_empty((0,) if symmetric else (N, (nb + 1) // 2), dtype=torch.uint8)
    return packed, scales, zp


@torch.library.register_fake(DEQUANTIZE)
def _dequantize_fake(packed, scales, zero_points, K):
    return packed.new_empty((packed.shape[0], K), dtype=torch.float32)


@torch.library.register_fake(LINEAR)
def _linear_fake(x, packed, scales, zero_points, bias, fast):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ----------------------------------------------------------------------------------------------------
# nibble packing helpers (pure PyTorch; used by GPTQ-style quantizers that choose codes themselves)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, nb, g] in 0..15 -> packed [N, nb, g/2] (even element in the low nibble)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """packed [N, nb, g/2] -> uint8 codes [N, nb, g]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_zero_points(zp: torch.Tensor) -> torch.Tensor:
    """uint8 zero points [N, nb] -> [N, ceil(nb/2)] (block 2i in the low nibble of byte i)."""
    N, nb = zp.shape
    if nb % 2:
        zp = torch.cat((zp, zp.new_zeros(N, 1)), dim=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).contiguous()


def unpack_zero_points(zp_packed: torch.Tensor, nb: int) -> torch.Tensor:
    """[N, ceil(nb/2)] -> uint8 zero points [N, nb]."""
    both = torch.stack((zp_packed & 0x0F, zp_packed >> 4), dim=-1).reshape(zp_packed.shape[0], -1)
    return both[:, :nb]


# ----------------------------------------------------------------------------------------------------
# wrappers


def quantize_q4(w: torch.Tensor, group_size: int = 64, symmetric: bool = True):
    """Quantize ``w [N, K]`` to 4 bits per group of ``group_size`` along K.

    Returns ``(packed uint8 [N, nb, g/2], scales float32 [N, nb], zero_points uint8 [N, ceil(nb/2)] or
    [0])`` in ONNX Runtime's MatMulNBits layout; see the module docstring for the exact rounding.
    """
    _check_quantize(w, group_size)
    return torch.ops.pyshrink.quantize_q4(w, group_size, symmetric)


def dequantize_q4(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of :func:`quantize_q4`: float32 ``[N, K]`` (the padding beyond K dropped)."""
    _check_weights("dequantize_q4", packed, scales, zero_points, K)
    return torch.ops.pyshrink.dequantize_q4(packed, scales, zero_points, K)


def linear_q4(x, packed, scales, zero_points, bias=None, fast: bool = False, *,
              in_features: int | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(W)^T (+ bias)`` on the packed weights; output has ``x``'s dtype.

    ``fast=True`` quantizes activations per block to int8 (integer dot products); ``fast=False`` keeps
    them in floating point. The packed layout (MatMulNBits') records only the number of groups, not K, so the
    op takes K from ``x``; pass ``in_features`` (the weights' K) to have an ``x`` of another width refused
    (without it, any width within the last group is taken as K). ``bias``: any float dtype, added in float32.
    """
    check(x.dim() >= 1, "linear_q4", f"x must be [..., K], got a {x.dim()}-d tensor")
    K = x.shape[-1] if in_features is None else in_features
    _check_weights("linear_q4", packed, scales, zero_points, K)
    _check_linear("linear_q4", x, packed.device, K, bias, packed.shape[0])
    return torch.ops.pyshrink.linear_q4(x, packed, scales, zero_points, bias, fast)
