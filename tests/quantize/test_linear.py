"""QuantLinear / QuantLinear8: same numbers as the op references on their own buffers, native op ran."""
import pytest
import torch

from pyshrink.ops import quantize_q4, quantize_q8
from pyshrink.ops.q4 import dequantize_q4_reference, linear_q4_reference
from pyshrink.ops.q8 import linear_q8_reference
from pyshrink.quantize import QuantLinear, QuantLinear8
from pyshrink.quantize.grid import Grid


def _close(a, b, rel=2e-5):
    err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)
    assert err < rel, f"relative max error {err:.3g}"


@pytest.mark.parametrize("K,N,g,symmetric,bias", [(96, 40, 32, True, True), (100, 33, 64, False, False),
                                                   (200, 17, 128, True, False), (50, 24, 128, False, True)])
@pytest.mark.parametrize("fast", [False, True])
def test_quantlinear_matches_reference(K, N, g, symmetric, bias, fast):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=bias)
    q = QuantLinear.from_float(lin, group_size=g, symmetric=symmetric, fast=fast)
    for shape in [(1, K), (3, K), (2, 5, K)]:
        x = torch.randn(*shape)
        ref = linear_q4_reference(x, q.packed, q.scales, q.zero_points, q.bias, fast)
        _close(q(x), ref)
        assert q(x).shape == (*shape[:-1], N)


def test_quantlinear_buffers_are_the_op_layout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 12, bias=False)
    q = QuantLinear.from_float(lin, group_size=32, symmetric=False)
    packed, scales, zp = quantize_q4(lin.weight.detach(), 32, False)
    assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales) and torch.equal(q.zero_points, zp)
    assert q.packed.shape == (12, 4, 16) and q.zero_points.shape == (12, 2)
    torch.testing.assert_close(q.dequantized_weight(), dequantize_q4_reference(packed, scales, zp, 100))
    # the pure-PyTorch grid (used by clipping and GPTQ) reproduces the kernel's rounding exactly at ratio 1
    for sym in (True, False):
        ref = quantize_q4(lin.weight.detach(), 32, sym)
        mine = Grid(4, 32, sym).quantize(lin.weight.detach())
        assert torch.equal(mine["packed"], ref[0]) and torch.equal(mine["zero_points"], ref[2])
        torch.testing.assert_close(mine["scales"], ref[1])
    q8 = Grid(8, 100).quantize(lin.weight.detach())
    assert torch.equal(q8["q"], quantize_q8(lin.weight.detach())[0])


def test_quantlinear8_matches_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 20)
    q = QuantLinear8.from_float(lin)
    x = torch.randn(4, 3, 70)
    _close(q(x), linear_q8_reference(x, q.q, q.scales, q.bias))
    w_err = (q.dequantized_weight() - lin.weight).norm() / lin.weight.norm()
    assert w_err < 0.01


def test_input_scale_is_applied():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    q = QuantLinear.from_float(lin, group_size=32)
    s = torch.rand(64) + 0.5
    qs = QuantLinear.from_buffers(q.buffers_dict(), 64, input_scale=s)
    x = torch.randn(3, 64)
    _close(qs(x), q(x * s))
    assert "input_scale" in qs.state_dict() and "input_scale" not in q.state_dict()


def test_native_op_runs():
    """forward is the native op (it shows in the profiler under its schema name), not a fallback."""
    q = QuantLinear.from_float(torch.nn.Linear(64, 16), group_size=32)
    q8 = QuantLinear8.from_float(torch.nn.Linear(64, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q(torch.randn(2, 64))
        q8(torch.randn(2, 64))
    names = {e.name for e in prof.events()}
    assert "pyshrink::linear_q4" in names and "pyshrink::linear_q8" in names
    import pyshrink.ops

    assert pyshrink.ops.NATIVE, "tests must run on the native kernels (pyshrink._C)"


def test_dtype_casts_leave_the_packed_format_alone():
    q = QuantLinear.from_float(torch.nn.Linear(64, 16), group_size=32)
    scales = q.scales.clone()
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales)
    assert q.packed.dtype == torch.uint8 and q.bias.dtype == torch.bfloat16
    y = q(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    q.float()
    q8 = QuantLinear8.from_float(torch.nn.Linear(64, 16)).half()
    assert q8.scales.dtype == torch.float32 and q8.q.dtype == torch.int8


@pytest.mark.parametrize("bits,kw", [(4, dict(group_size=32, symmetric=True)),
                                     (4, dict(group_size=64, symmetric=False)), (8, {})])
def test_concat_outputs_computes_what_the_separate_layers_compute(bits, kw):
    torch.manual_seed(0)
    cls = QuantLinear if bits == 4 else QuantLinear8
    layers = [cls.from_float(torch.nn.Linear(100, n, bias=True), **kw) for n in (24, 8, 8)]
    fused = cls.concat_outputs(layers)
    assert type(fused) is cls and fused.out_features == 40 and fused.in_features == 100
    x = torch.randn(3, 100)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in layers], dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(fused.dequantized_weight(), torch.cat([m.dequantized_weight() for m in layers]))


def test_concat_outputs_refuses_layers_that_cannot_share_a_call():
    a = QuantLinear.from_float(torch.nn.Linear(64, 8), group_size=32)
    with pytest.raises(ValueError, match="cannot concatenate"):
        QuantLinear.concat_outputs([a, QuantLinear.from_float(torch.nn.Linear(64, 8), group_size=64)])
    with pytest.raises(ValueError, match="cannot concatenate"):
        QuantLinear.concat_outputs([a, QuantLinear8.from_float(torch.nn.Linear(64, 8))])
    with pytest.raises(ValueError, match="bias"):
        QuantLinear.concat_outputs([a, QuantLinear.from_float(torch.nn.Linear(64, 8, bias=False), group_size=32)])


@pytest.mark.parametrize("cls", [QuantLinear, QuantLinear8])
def test_an_input_of_the_wrong_width_is_refused(cls):
    """100 and 120 inputs fill the same 4 groups of 32: the 4-bit op alone would not notice."""
    layer = cls.from_float(torch.nn.Linear(100, 8), **({"group_size": 32} if cls is QuantLinear else {}))
    layer(torch.randn(2, 100))
    with pytest.raises(ValueError, match="input has 120 features, the layer takes 100"):
        layer(torch.randn(2, 120))


def test_a_group_size_the_kernels_lack_is_refused():
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128, got 33"):
        QuantLinear(64, 8, group_size=33)

