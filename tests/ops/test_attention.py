"""pyshrink::filled_attention: float64 attention over the kept positions only, never reading the rest of the
cache; opcheck; clear errors for a bad length."""
import math

import pytest
import torch

from pyshrink.ops import attention


def _reference(q, k, v, keep, scale):
    s = q.double() @ k.double().transpose(-1, -2) * scale
    return s.masked_fill(~keep, -math.inf).softmax(-1) @ v.double()


def _case(seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 3, 16, generator=g)
    k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(2))
    keep = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    keep[0, ..., 2:19] = True
    keep[1, ..., :25] = True  # rows differ; the last position any row keeps is 24, in the last row
    return q, k, v, keep


def test_reads_only_the_kept_positions():
    q, k, v, keep = _case()
    want = _reference(q, k[:, :, :25], v[:, :, :25], keep[..., :25], 0.25)
    k[:, :, 25:], v[:, :, 25:] = float("nan"), float("nan")  # a static cache's unfilled tail, never to be read
    assert int(attention.kept_length(keep)) == 25
    got = attention.filled_attention(q, k, v, keep, 0.25)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    additive = torch.zeros(2, 1, 1, 40).masked_fill(~keep, float("-inf"))
    assert int(attention.kept_length(additive)) == 25
    torch.testing.assert_close(attention.filled_attention(q, k, v, additive, 0.25), got, rtol=0, atol=1e-6)
    # torch's SDPA over the whole cache under the same mask reads the NaN tail
    assert torch.isnan(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25)).all()


def test_opcheck_and_compile():
    q, k, v, keep = _case(2)
    torch.library.opcheck(torch.ops.pyshrink.filled_attention.default, (q, k, v, keep, attention.kept_length(keep), 0.25))
    compiled = torch.compile(attention.filled_attention, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, keep, 0.25), attention.filled_attention(q, k, v, keep, 0.25))


def test_nothing_kept_reads_the_whole_cache():
    q, k, v, keep = _case(4)
    none = torch.zeros_like(keep)
    assert int(attention.kept_length(none)) == 0
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=none, scale=0.25)
    torch.testing.assert_close(attention.filled_attention(q, k, v, none, 0.25), want, equal_nan=True)


def test_bad_length():
    q, k, v, keep = _case()
    op = torch.ops.pyshrink.filled_attention
    with pytest.raises(ValueError, match="outside 0..40"):
        op(q, k, v, keep, torch.tensor(41), None)
    with pytest.raises(ValueError, match="one integer"):
        op(q, k, v, keep, torch.tensor([3, 4]), None)
    with pytest.raises(ValueError, match="one integer"):
        op(q, k, v, keep, torch.tensor(3.0), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    q, k, v, keep = _case(3)
    want = attention.filled_attention(q, k, v, keep, 0.25)
    args = [t.cuda() for t in (q, k, v, keep)]
    got = attention.filled_attention(*args, 0.25)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)
    torch.library.opcheck(torch.ops.pyshrink.filled_attention.default, (*args, attention.kept_length(args[3]), 0.25))
    compiled = torch.compile(attention.filled_attention, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args, 0.25).cpu(), want, rtol=0, atol=1e-5)
