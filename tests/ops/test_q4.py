"""quantize_q4 / dequantize_q4: native kernels against the pure-PyTorch references.

The kernels divide (w / scale, IEEE) and round half to even exactly as the float32 reference does, so the
codes are expected to be bit-identical: the mismatch rate is asserted to be exactly 0, including on inputs
built to land on rounding ties.
"""
import pytest
import torch

import pyshrink.ops as ops
from pyshrink.ops import q4

SHAPES = [(7, 200), (33, 576), (130, 1000)]


def _quantize_both(w, g, sym):
    got = torch.ops.pyshrink.quantize_q4(w, g, sym)
    ref = q4.quantize_q4_reference(w, g, sym)
    return got, ref


def _assert_identical(got, ref):
    (p, s, z), (pr, sr, zr) = got, ref
    assert p.shape == pr.shape and p.dtype == torch.uint8
    codes, codes_ref = q4.unpack_codes(p), q4.unpack_codes(pr)
    mismatch = (codes != codes_ref).float().mean().item()
    assert mismatch == 0.0, f"code mismatch rate {mismatch:.2e}"
    assert torch.equal(p, pr)
    assert torch.equal(s, sr)
    assert torch.equal(z, zr)


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("g", q4.GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_quantize_matches_reference(isa, gen, N, K, g, sym):
    w = torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen) * 3
    _assert_identical(*_quantize_both(w, g, sym))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_quantize_half_dtypes_and_noncontiguous(isa, gen, dtype, sym):
    w = torch.randn(200, 33, generator=gen).to(dtype).T  # [33, 200], column stride != 1
    assert not w.is_contiguous()
    _assert_identical(*_quantize_both(w, 64, sym))


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_quantize_rounding_ties_and_edge_groups(isa, sym):
    g = 32
    # group 0: w / scale lands exactly on k + 0.5 (scale = 1 for sym: max |w| = -8 -> scale = 1)
    ties = torch.tensor([-8.0] + [k + 0.5 for k in range(-8, 7)] * 2 + [0.5]).reshape(1, g)
    zeros = torch.zeros(1, g)  # scale 0: q = 8 (sym) or q = zp = 0 (asym)
    pos = torch.rand(1, g) + 0.5  # asymmetric: lo = 0
    neg = -torch.rand(1, g) - 0.5  # asymmetric: hi = 0
    ties_pm = torch.tensor([8.0, -8.0] * 16).reshape(1, g)  # |w| ties: the first one sets the sign
    w = torch.cat([ties, zeros, pos, neg, ties_pm], dim=1)
    (p, s, z), ref = _quantize_both(w, g, sym)
    _assert_identical((p, s, z), ref)
    if sym:
        assert s[0, 1] == 0 and (q4.unpack_codes(p)[0, 1] == 8).all()
        assert s[0, 4] == -1.0  # the first extreme (+8) gives scale 8 / -8
    else:
        assert s[0, 1] == 0 and (q4.unpack_codes(p)[0, 1] == 0).all()


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("g", q4.GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_round_trip(isa, gen, N, K, g, sym):
    w = torch.randn(N, K, generator=gen)
    p, s, z = ops.quantize_q4(w, g, sym)
    d = ops.dequantize_q4(p, s, z, K)
    assert d.shape == (N, K) and d.dtype == torch.float32
    assert torch.equal(d, q4.dequantize_q4_reference(p, s, z, K))  # bit-identical to the reference
    # every element within half a step of its original (the symmetric code 7 end can clip by one more
    # half step: +|m| maps to 7.5 steps, which rounds to 8 and clamps to 7 -> error up to one step)
    step = s.abs().repeat_interleave(g, dim=1)[:, :K]
    err = (d - w).abs()
    limit = (step if sym else step / 2) * (1 + 1e-5) + 1e-7
    assert (err <= limit).all(), f"max err / step = {(err / step).max():.4f}"
    if sym:  # only the clipped +|m| end may exceed half a step
        assert (err <= step / 2 * (1 + 1e-5) + 1e-7).float().mean() > 0.99


def test_dequantize_accepts_noncontiguous(gen):
    w = torch.randn(33, 200, generator=gen)
    p, s, z = ops.quantize_q4(w, 32, False)
    pn, sn = p.transpose(0, 1).contiguous().transpose(0, 1), s.T.contiguous().T
    assert not pn.is_contiguous() and not sn.is_contiguous()
    assert torch.equal(ops.dequantize_q4(pn, sn, z, 200), ops.dequantize_q4(p, s, z, 200))


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_opcheck(gen, sym):
    w = torch.randn(9, 100, generator=gen)
    torch.library.opcheck(torch.ops.pyshrink.quantize_q4.default, (w, 32, sym))
    p, s, z = ops.quantize_q4(w, 32, sym)
    torch.library.opcheck(torch.ops.pyshrink.dequantize_q4.default, (p, s, z, 100))


def test_wrapper_errors():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"pyshrink.quantize_q4: group_size must be one of"):
        ops.quantize_q4(w, 48)
    with pytest.raises(ValueError, match=r"pyshrink.quantize_q4: w must be 2-D"):
        ops.quantize_q4(w[0], 32)
    with pytest.raises(ValueError, match=r"pyshrink.quantize_q4: w must be float32, float16 or bfloat16"):
        ops.quantize_q4(w.double(), 32)
    p, s, z = ops.quantize_q4(w, 32)
    with pytest.raises(ValueError, match=r"pyshrink.dequantize_q4: K=100 needs 4 blocks of 32"):
        ops.dequantize_q4(p, s, z, 100)
    with pytest.raises(ValueError, match=r"pyshrink.dequantize_q4: scales must be float32"):
        ops.dequantize_q4(p, s.double(), z, 64)


def test_kernel_errors():
    """The C++ kernels check again (torch.ops.* bypasses the wrappers): RuntimeError naming the op."""
    w = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match=r"pyshrink.quantize_q4: group_size must be one of \(32, 64, 128\), got 48"):
        torch.ops.pyshrink.quantize_q4(w, 48, True)
    with pytest.raises(RuntimeError, match=r"pyshrink.quantize_q4: w must be float32, float16 or bfloat16, got Double"):
        torch.ops.pyshrink.quantize_q4(w.double(), 32, True)
    p, s, z = ops.quantize_q4(w, 32, False)
    with pytest.raises(RuntimeError, match=r"pyshrink.dequantize_q4: K=100 needs 4 blocks of 32, but the weights have 2"):
        torch.ops.pyshrink.dequantize_q4(p, s, z, 100)
    with pytest.raises(RuntimeError, match=r"pyshrink.dequantize_q4: zero_points must be empty \(symmetric\) or \[4, 1\]"):
        torch.ops.pyshrink.dequantize_q4(p, s, torch.zeros(4, 3, dtype=torch.uint8), 64)
    with pytest.raises(RuntimeError, match=r"pyshrink.dequantize_q4: group size 40"):
        torch.ops.pyshrink.dequantize_q4(torch.zeros(4, 2, 20, dtype=torch.uint8), s, z, 64)


def test_meta_tensors_use_the_fake():
    w = torch.empty(8, 100, device="meta")
    p, s, z = ops.quantize_q4(w, 64, False)
    assert p.device.type == "meta" and p.shape == (8, 2, 32) and s.shape == (8, 2) and z.shape == (8, 1)
    with pytest.raises(ValueError, match=r"pyshrink.dequantize_q4: packed, scales and zero_points must share a device"):
        ops.dequantize_q4(p, torch.zeros(8, 2), z, 100)
