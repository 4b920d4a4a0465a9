"""act_stats_: native kernel against the float64 reference (float64 accumulation: agreement to ~1e-12)."""
import pytest
import torch

import pyshrink.ops as ops
from pyshrink.ops import act_stats


def _compare(x, calls=1):
    C = x.shape[-1]
    acc, cnt = ops.new_accumulators(C)
    acc_ref, cnt_ref = ops.new_accumulators(C)
    for _ in range(calls):
        ops.act_stats_(x, acc, cnt)
        act_stats.act_stats_reference(x, acc_ref, cnt_ref)
    assert torch.equal(cnt, cnt_ref)
    # float64 sums in a different order: relative error ~ n * 2^-53 of the sum of |terms|
    mag = acc_ref[0:1].expand(3, C).clone()
    mag[2] = acc_ref[2]
    assert ((acc - acc_ref).abs() <= 1e-12 * mag + 1e-300).all()
    return acc, cnt


@pytest.mark.parametrize("shape", [(1, 7), (3, 130), (17, 1000), (2, 64, 576), (4096, 12), (300, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference(isa, gen, shape, dtype):
    x = (torch.randn(*shape, generator=gen) * 3 + 0.5).to(dtype)
    _compare(x, calls=2)  # accumulates in place across calls


def test_noncontiguous_inputs(isa, gen):
    base = torch.randn(6, 50, 130, generator=gen)
    for x in (base.permute(1, 0, 2), base[:, ::3, 1::2], base.transpose(1, 2), base.bfloat16().permute(2, 0, 1)):
        assert not x.is_contiguous()
        _compare(x)


def test_both_thread_splits(gen):
    """Few rows and many channels (split over channels); rows of any width with enough of them (per-thread
    partials), including a row count that leaves the last batch partial, narrow rows several to a page, and rows
    so wide that the walk takes longer batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _compare(torch.randn(12, 4096, generator=gen))
        _compare(torch.randn(40, 4096, generator=gen))  # rows enough, but the partials would be large: channels
        _compare(torch.randn(64, 2048, generator=gen))
        _compare(torch.randn(8192, 24, generator=gen))
        _compare(torch.randn(1001, 576, generator=gen).bfloat16())
        _compare(torch.randn(3, 333, 200, generator=gen)[:, 1:, :130])
        _compare(torch.randn(130, 25000, generator=gen))  # sums too wide for L2: 64-row batches, a partial one
    finally:
        torch.set_num_threads(threads)


def test_empty_rows_count_zero():
    acc, cnt = _compare(torch.empty(0, 5))
    assert cnt.item() == 0 and (acc == 0).all()


def test_zero_channels_still_count_rows():
    acc, cnt = _compare(torch.empty(2, 7, 0))
    assert cnt.item() == 14 and acc.shape == (3, 0)


def test_opcheck(gen):
    x = torch.randn(3, 5, 40, generator=gen)
    acc, cnt = ops.new_accumulators(40)
    torch.library.opcheck(torch.ops.pyshrink.act_stats_.default, (x, acc, cnt))


def test_errors():
    x = torch.randn(4, 8)
    acc, cnt = ops.new_accumulators(8)
    with pytest.raises(ValueError, match=r"pyshrink.act_stats_: acc must be float64 of shape \(3, 8\)"):
        ops.act_stats_(x, acc.float(), cnt)
    with pytest.raises(ValueError, match=r"pyshrink.act_stats_: x must be float32, float16 or bfloat16"):
        ops.act_stats_(x.int(), acc, cnt)
    with pytest.raises(ValueError, match=r"pyshrink.act_stats_: x, acc and count must be on one device"):
        ops.act_stats_(x.to("meta"), acc, cnt)
    op = torch.ops.pyshrink.act_stats_
    with pytest.raises(RuntimeError, match=r"pyshrink.act_stats_: acc must be float64 of shape \(3, 8\), got Double \[3, 7\]"):
        op(x, torch.zeros(3, 7, dtype=torch.float64), cnt)
    with pytest.raises(RuntimeError, match=r"pyshrink.act_stats_: acc must be contiguous"):
        op(x, torch.zeros(8, 3, dtype=torch.float64).T, cnt)
    with pytest.raises(RuntimeError, match=r"pyshrink.act_stats_: count must be float64 of shape \(1,\)"):
        op(x, acc, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"pyshrink.act_stats_: x must be float32, float16 or bfloat16, got Double"):
        op(x.double(), acc, cnt)
