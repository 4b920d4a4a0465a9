"""Calibration hooks: statistics come from the native act_stats_ op, one block at a time, on every token."""
import pytest
import torch

import pyshrink.contract.calibration as calib
from pyshrink.arch import adapter_for
from pyshrink.ops import act_stats_

from pyshrink_tiny_models import tiny_model


def test_channel_stats_match_direct_computation():
    x = torch.randn(3, 50, 7)
    st = calib.ChannelStats(7)
    st.add(x)
    flat = x.reshape(-1, 7).double()
    assert st.n == 150
    torch.testing.assert_close(st.mean_abs, flat.abs().mean(0))
    torch.testing.assert_close(st.mean, flat.mean(0))
    torch.testing.assert_close(st.variance, flat.var(0, unbiased=False))
    torch.testing.assert_close(st.gram, flat.T @ flat, rtol=1e-5, atol=1e-4)  # float32 products, float64 sums


def test_gram_summed_by_bands_is_the_whole_symmetric_matrix(monkeypatch):
    """ChannelStats.add sums x^T x right of the diagonal, a band of GRAM_ROWS rows at a time, and reading the
    matrix mirrors it: small bands (5 rows of 13 channels, the last band partial) must give the whole matrix,
    also when it is read between two adds."""
    monkeypatch.setattr(calib, "GRAM_ROWS", 5)
    torch.manual_seed(0)
    xs = [torch.randn(2, 9, 13) + 0.5 for _ in range(3)]
    st = calib.ChannelStats(13)
    st.add(xs[0])
    first = xs[0].reshape(-1, 13).double()
    torch.testing.assert_close(st.gram, first.T @ first, rtol=1e-5, atol=1e-4)
    st.add(xs[1])
    st.add(xs[2])
    flat = torch.cat(xs).reshape(-1, 13).double()
    torch.testing.assert_close(st.gram, flat.T @ flat, rtol=1e-5, atol=1e-4)
    st.add(xs[0])
    st.gram = None  # freed right after an add: nothing left to mirror
    assert st.gram is None


def test_few_tokens_are_held_as_they_are_then_replaced_by_their_gram_matrix():
    """Up to ``max_samples`` tokens the statistics keep the tokens themselves (float32, copied); the add that would
    pass it sums them, chunk by chunk, into the Gram matrix: the same matrix, bit for bit, as one summed from the
    first add. The default is SAMPLES_PER_CHANNEL per channel; freeing drops held tokens too."""
    torch.manual_seed(1)
    xs = [torch.randn(1, 9, 13) + 0.5 for _ in range(3)]
    held, summed = calib.ChannelStats(13, max_samples=20), calib.ChannelStats(13, max_samples=0)
    assert held.samples is None and calib.ChannelStats(13).max_samples == int(calib.SAMPLES_PER_CHANNEL * 13)
    for x in xs[:2]:
        held.add(x)
        summed.add(x)
    first = xs[0].clone()
    xs[0].zero_()  # the model's activation, reused after the hook: the held copy must not change
    assert held.samples.dtype == torch.float32
    assert torch.equal(held.samples, torch.cat([first, xs[1]]).reshape(18, 13))
    xs[0].copy_(first)
    held.add(xs[2])  # 27 > 20 tokens
    summed.add(xs[2])
    assert held.samples is None
    assert torch.equal(held.gram, summed.gram)
    assert held.n == summed.n == 27
    few = calib.ChannelStats(13, max_samples=20)
    few.add(xs[1][:, :0])  # no tokens: nothing held
    assert few.samples is None and few.n == 0
    few.add(xs[1])
    assert torch.equal(few.samples, xs[1][0])
    few.add(xs[2][:, :2])
    assert torch.equal(few.samples, torch.cat([xs[1][0], xs[2][0, :2]]))
    few.add(xs[2][:, 2:4])  # read, then more tokens within the limit: read again, all of them
    assert torch.equal(few.samples, torch.cat([xs[1][0], xs[2][0, :4]]))
    few.gram = None
    assert few.samples is None and few.gram is None
    few.add(xs[1])  # freed: nothing kept any more
    assert few.samples is None and few.gram is None


def test_hooks_use_act_stats_and_see_every_token(monkeypatch):
    calls = []

    def spy(x, acc, count):
        calls.append(x.shape)
        act_stats_(x, acc, count)

    monkeypatch.setattr(calib, "act_stats_", spy)
    model = tiny_model("llama")
    ad = adapter_for(model)
    batches = [torch.randint(0, 300, (2, 16)) for _ in range(3)]
    seen = {}

    def consume(i, block, obs):
        seen[i] = (obs.mlp.n, obs.attn.n, obs.tokens)
        return i

    assert calib.observe_blocks(model, ad, batches, consume, heads=True, progress=False) == [0, 1, 2]
    assert seen == {i: (96.0, 96.0, 96) for i in range(3)}
    assert len(calls) == 3 * 3 * 2  # blocks x batches x (down_proj input, o_proj input)
    # no hook is left behind
    for blk in ad.blocks(model):
        assert not ad.mlp_out_module(blk)._forward_pre_hooks and not blk._forward_hooks


def test_observation_does_not_change_the_model():
    model = tiny_model("gpt2")
    ad = adapter_for(model)
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    calib.observe_blocks(model, ad, [ids], lambda i, b, o: None, heads=True, progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_float64_bands_copy_each_band_into_one_buffer(monkeypatch, dtype):
    """Bands of 4 rows of an 11-row matrix (the last partial), each the float64 values of its rows, all in one buffer
    (or the one given); changing a band in place leaves the matrix as it was."""
    monkeypatch.setattr(calib, "GRAM_ROWS", 4)
    t = torch.randn(11, 6).to(dtype)
    before = t.clone()
    for buf in (None, torch.empty(4, 6, dtype=torch.float64)):
        seen, ptrs = [], set()
        for r0, r1, band in calib.float64_bands(t, buf):
            assert band.dtype == torch.float64 and torch.equal(band, t[r0:r1].double())
            seen.append((r0, r1))
            ptrs.add(band.data_ptr())
            band.mul_(2)
        assert seen == [(0, 4), (4, 8), (8, 11)]
        assert len(ptrs) == 1 and (buf is None or ptrs == {buf.data_ptr()})
        assert torch.equal(t, before)
