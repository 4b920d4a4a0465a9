"""The math of choosing and refitting channels, on synthetic layers with known answers."""
import itertools

import pytest
import torch

from pyshrink.contract import scores
from pyshrink.contract import calibration
from pyshrink.contract.calibration import ChannelStats


def _layer(x, w, b=None, group=1, held=False):
    """The layer reading ``x``, whose statistics hold the tokens themselves (``held``) or their Gram matrix."""
    st = ChannelStats(x.shape[1], max_samples=len(x) if held else 0)
    st.add(x)
    assert (st.samples is not None) == held
    return scores.Layer(w.double(), None if b is None else b.double(), st, group=group)


def test_statistics_of_no_tokens_refit_to_the_weights_as_they_are():
    """A layer whose statistics saw only empty batches: the bias stays, the kept weights stay (least squares: the
    ridge's minimal solution, zero), and the error is 0, not the 0 / 0 of an empty set of held tokens."""
    torch.manual_seed(10)
    w, b = torch.randn(5, 16), torch.randn(5)
    st = ChannelStats(16)
    st.add(torch.zeros(0, 16))
    layer = scores.Layer(w.double(), b.double(), st)
    keep = torch.arange(4)
    for mode in ("lstsq", "mean", "none"):
        w_new, b_new, err = scores.refit_with_error(layer, keep, mode)
        kept = torch.zeros(5, 4, dtype=torch.float64) if mode == "lstsq" else w.double()[:, :4]
        torch.testing.assert_close(w_new, kept, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b_new, b.double(), rtol=1e-9, atol=1e-12)
        assert err == 0.0


def _empirical_error(x, w, b, keep, w_new, b_new, group=1):
    K = scores._channels(keep, group)
    y = x.double() @ w.double().T + (0 if b is None else b.double())
    y_new = x.double()[:, K] @ w_new.T + (0 if b_new is None else b_new)
    return float((y_new - y).pow(2).sum(1).mean())


def test_output_error_matches_empirical():
    torch.manual_seed(0)
    x, w, b = torch.randn(512, 24) + 0.3, torch.randn(8, 24), torch.randn(8)
    layer = _layer(x, w, b)
    keep = torch.arange(0, 24, 2)
    for mode in ("lstsq", "mean", "none"):
        w_new, b_new = scores.refit(layer, keep, mode)
        assert scores.output_error(layer, keep, w_new, b_new) == pytest.approx(
            _empirical_error(x, w, b, keep, w_new, b_new), rel=1e-6)


@pytest.mark.parametrize("group,bias,rows", [(1, True, 1024), (1, False, 4), (3, True, 5), (3, False, 4)])
def test_refit_with_error_gives_the_refit_and_its_output_error(monkeypatch, group, bias, rows):
    """The least-squares refit's error read from its normal equations, with the Gram matrix read in bands of
    ``rows`` rows (4 and 5: several bands, the last partial), against :func:`output_error` and the samples; the other
    modes' errors against the samples. Kept groups: a few, unsorted, a single one, and all of them."""
    monkeypatch.setattr(calibration, "GRAM_ROWS", rows)
    monkeypatch.setattr(calibration, "BAND_BYTES", 0)  # products' bands of GRAM_ROWS rows too
    torch.manual_seed(6)
    C = 27
    x = torch.randn(400, C) * torch.rand(C) + 0.4
    w, b = torch.randn(9, C), (torch.randn(9) if bias else None)
    layer = _layer(x, w, b, group=group)
    total = float((x.double() @ w.double().T).pow(2).sum(1).mean())  # E||x W^T||^2
    keeps = [torch.tensor([0, 2, 3, 5, 8]), torch.tensor([8, 0, 5]), torch.tensor([4]), torch.arange(C // group)]
    for keep, mode in itertools.product(keeps, ("lstsq", "mean", "none")):
        w_new, b_new, err = scores.refit_with_error(layer, keep, mode)
        # absolute slack for keeping everything, where the error is the damping's alone: against the same Gram
        # matrix, float64 rounding of E||y||^2; against the samples, the Gram matrix's float32 products
        if mode == "lstsq":
            assert err == pytest.approx(scores.output_error(layer, keep, w_new, b_new), rel=1e-9, abs=1e-12 * total)
        assert err == pytest.approx(_empirical_error(x, w, b, keep, w_new, b_new, group), rel=1e-6, abs=1e-7 * total)
        w_only, b_only = scores.refit(layer, keep, mode)  # the same refit, without its error
        torch.testing.assert_close(w_only, w_new, rtol=0, atol=0)
    no_stats = scores.Layer(w.double(), None, None, group=group)
    w_new, b_new, err = scores.refit_with_error(no_stats, keep, "lstsq")
    torch.testing.assert_close(w_new, w.double()[:, scores._channels(keep, group)])
    assert b_new is None and err != err  # NaN: no statistics, no error


def test_lstsq_falls_back_to_lu_when_cholesky_fails(monkeypatch):
    """A factorization that reports failure (a degenerate Gram matrix under a tiny ridge) is solved by LU instead:
    the same refit and error as the Cholesky path, on a layer where both work."""
    torch.manual_seed(7)
    x, w, b = torch.randn(300, 16) + 0.2, torch.randn(5, 16), torch.randn(5)
    layer = _layer(x, w, b)
    keep = torch.tensor([1, 4, 6, 9, 10, 15])
    chol = scores.refit_with_error(layer, keep)
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (real(A)[0], torch.tensor(1, dtype=torch.int32)))
    lu = scores.refit_with_error(layer, keep)
    torch.testing.assert_close(lu[0], chol[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lu[1], chol[1], rtol=1e-9, atol=1e-12)
    assert lu[2] == pytest.approx(chol[2], rel=1e-9)


def test_lstsq_recovers_redundant_channels_and_beats_mean_and_none():
    torch.manual_seed(1)
    base = torch.randn(1024, 12) + 1.0
    mix = torch.randn(12, 6)
    x = torch.cat([base, base @ mix + 0.5], 1)  # channels 12..17 are affine in 0..11
    w = torch.randn(5, 18)
    layer = _layer(x, w)
    keep = torch.arange(12)
    errs = {m: scores.output_error(layer, keep, *scores.refit(layer, keep, m, damp=1e-9)) for m in ("lstsq", "mean", "none")}
    total = float((x.double() @ w.double().T).pow(2).sum(1).mean())
    assert errs["lstsq"] < 1e-6 * total
    assert errs["lstsq"] < errs["mean"] < errs["none"]


def test_obs_removes_the_redundant_channels():
    torch.manual_seed(2)
    base = torch.randn(2048, 10)
    x = torch.cat([base, base[:, :4] * 2 + 0.01 * torch.randn(2048, 4)], 1)  # 10..13 duplicate 0..3
    w = torch.randn(6, 14)
    w[:, 10:] *= 5  # large weights: magnitude would keep the duplicates
    layer = _layer(x, w)
    removed = scores.obs(layer, 4, steps=4)
    # one of every duplicated pair goes, none of the unique channels
    assert set(removed.tolist()) <= set(range(14)) - set(range(4, 10))
    for i in range(4):
        assert (i in removed.tolist()) != (i + 10 in removed.tolist())
    assert set(scores.magnitude(layer, 4).tolist()).isdisjoint(range(10, 14))


def test_obs_beats_fluctuation_and_magnitude_on_correlated_channels():
    torch.manual_seed(3)
    x = torch.randn(4096, 16) @ torch.randn(16, 32) * torch.rand(32) * 2
    w = torch.randn(8, 32)
    layer = _layer(x, w)
    err = {}
    for name in ("obs", "fluctuation", "magnitude"):
        keep = scores.kept_groups(layer, scores.CRITERIA[name](layer, 20))
        err[name] = scores.output_error(layer, keep, *scores.refit(layer, keep, "lstsq"))
    assert err["obs"] <= min(err["fluctuation"], err["magnitude"]) * 1.0001


def test_grouped_obs_respects_buckets():
    torch.manual_seed(4)
    x, w = torch.randn(1024, 24), torch.randn(6, 24)
    layer = _layer(x, w, group=4)  # 6 groups of 4 channels
    bucket = torch.tensor([0, 0, 0, 1, 1, 1])
    removed = scores.obs(layer, 4, bucket=bucket, per_bucket=2)
    assert sorted(bucket[removed].tolist()) == [0, 0, 1, 1]
    keep = scores.kept_groups(layer, removed)
    w_new, b_new = scores.refit(layer, keep)
    assert w_new.shape == (6, 8)


@pytest.mark.parametrize("rows,held", [(1024, False), (3, False), (1024, True), (3, True)])
def test_lstsq_refit_solves_the_damped_normal_equations_of_the_kept_channels(monkeypatch, rows, held):
    """Against float64 least squares built from the samples themselves: min E||[x_K, 1] W'^T - (x W^T + b)||^2 plus
    the ridge on the channels' part of the normal equations (the Gram matrix read in one band, and in bands of 3;
    or the tokens held, in bands of 3 tokens)."""
    monkeypatch.setattr(calibration, "GRAM_ROWS", rows)
    monkeypatch.setattr(calibration, "BAND_BYTES", 0)  # products' bands of GRAM_ROWS rows too
    torch.manual_seed(5)
    x, w, b = torch.randn(700, 20) * torch.rand(20) + 0.2, torch.randn(7, 20), torch.randn(7)
    layer = _layer(x, w, b, held=held)
    keep, damp = torch.tensor([0, 2, 3, 7, 11, 12, 19]), 0.05
    X = torch.cat([x.double()[:, keep], torch.ones(700, 1, dtype=torch.float64)], 1)
    A = X.T @ X / 700
    A.diagonal()[:-1] += damp * A.diagonal()[:-1].mean()
    ref = torch.linalg.solve(A, X.T @ (x.double() @ w.double().T + b.double()) / 700).T
    w_new, b_new = scores.refit(layer, keep, "lstsq", damp=damp)
    # the Gram matrix is summed from float32 products: agreement to float32's precision; the held tokens are exact
    tol = dict(rtol=1e-9, atol=1e-12) if held else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_new, ref[:, :-1], **tol)
    torch.testing.assert_close(b_new, ref[:, -1], **tol)


@pytest.mark.parametrize("tokens", [12, 90])
@pytest.mark.parametrize("group,bias", [(1, True), (3, False)])
def test_the_held_tokens_give_the_gram_matrix_refit_and_errors(monkeypatch, tokens, group, bias):
    """Planning from the held tokens (fewer tokens than kept channels, and more) against planning from their Gram
    matrix, on data whose float32 products are exact (multiples of 1/4 below 2), so that the two solve the same
    problem and must agree to float64 rounding: the least-squares refit, its error, and the other modes' errors.
    Then every error against the samples. Kept groups: a few, unsorted, a single one, and all of them."""
    monkeypatch.setattr(calibration, "GRAM_ROWS", 5)  # tokens and channels in several bands
    monkeypatch.setattr(calibration, "BAND_BYTES", 0)  # products' bands of GRAM_ROWS rows too
    torch.manual_seed(8)
    C = 36
    x = torch.randint(-7, 8, (tokens, C)).float() / 4 + (torch.arange(C) % 3 == 0) * 0.5
    w, b = torch.randn(9, C), (torch.randn(9) if bias else None)
    held, summed = _layer(x, w, b, group, held=True), _layer(x, w, b, group)
    keeps = [torch.tensor([0, 2, 3, 5, 8, 11]), torch.tensor([8, 0, 5]), torch.tensor([4]), torch.arange(C // group)]
    total = float((x.double() @ w.double().T).pow(2).sum(1).mean())
    for keep, mode in itertools.product(keeps, ("lstsq", "mean", "none")):
        wh, bh, eh = scores.refit_with_error(held, keep, mode)
        ws, bs, es = scores.refit_with_error(summed, keep, mode)
        torch.testing.assert_close(wh, ws, rtol=1e-9, atol=1e-12)
        if bias or mode != "none":
            torch.testing.assert_close(bh, bs, rtol=1e-9, atol=1e-12)
        assert eh == pytest.approx(es, rel=1e-9, abs=1e-13 * total)
        assert scores.output_error(held, keep, wh, bh) == pytest.approx(eh, rel=1e-9, abs=1e-13 * total)
        assert eh == pytest.approx(_empirical_error(x, w, b, keep, wh, bh, group), rel=1e-9, abs=1e-13 * total)
        assert held.stats.samples is not None  # planning from the tokens never built their Gram matrix


def test_criteria_sum_the_squared_weights_by_bands(monkeypatch):
    """magnitude and fluctuation square the output weights a band of rows at a time (5 here: several bands, the last
    partial): the same scores as squaring the whole matrix, so the same groups removed."""
    torch.manual_seed(9)
    x, w = torch.randn(200, 24) * torch.rand(24), torch.randn(13, 24)
    layer = _layer(x, w, group=2)
    sq = w.double().pow(2).sum(0)  # the criteria's definitions, on the whole matrix
    whole = {"magnitude": sq.view(12, 2).sum(1).sqrt().argsort()[:5],
             "fluctuation": (x.double().var(0, unbiased=False) * sq).view(12, 2).sum(1).argsort()[:5]}
    monkeypatch.setattr(calibration, "GRAM_ROWS", 5)
    monkeypatch.setattr(calibration, "BAND_BYTES", 0)  # products' bands of GRAM_ROWS rows too
    torch.testing.assert_close(scores._column_sq_sums(layer.weight), layer.weight.pow(2).sum(0), rtol=1e-14, atol=0)
    for name, removed in whole.items():
        assert torch.equal(scores.CRITERIA[name](layer, 5), removed), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("held", [False, True])
def test_a_layer_reads_its_projection_in_its_own_dtype(monkeypatch, dtype, held):
    """The weight stays in the projection's dtype (no float64 copy of a whole down projection) and is read in float64
    by bands and gathers (bands of 5 rows: the 9 outputs in two): every criterion, refit mode and error is the same as
    from its float64 copy, and the weight is left as it was."""
    monkeypatch.setattr(calibration, "GRAM_ROWS", 5)
    monkeypatch.setattr(calibration, "BAND_BYTES", 0)  # products' bands of GRAM_ROWS rows too
    torch.manual_seed(11)
    x, w, b = torch.randn(40 if held else 300, 24) * torch.rand(24) + 0.1, torch.randn(9, 24).to(dtype), torch.randn(9)
    st = ChannelStats(24, max_samples=len(x) if held else 0)
    st.add(x)
    own, wide = scores.Layer(w, b.double(), st, group=2), scores.Layer(w.double(), b.double(), st, group=2)
    before = w.clone()
    for name in scores.CRITERIA:
        assert torch.equal(scores.CRITERIA[name](own, 5), scores.CRITERIA[name](wide, 5)), name
    for keep, mode in itertools.product([torch.tensor([0, 3, 4, 7, 10]), torch.arange(12)], ("lstsq", "mean", "none")):
        got, ref = scores.refit_with_error(own, keep, mode), scores.refit_with_error(wide, keep, mode)
        assert got[0].dtype == got[1].dtype == torch.float64
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
        assert got[2] == pytest.approx(ref[2], rel=1e-10, abs=1e-12)
        assert scores.output_error(own, keep, got[0], got[1]) == pytest.approx(ref[2], rel=1e-9, abs=1e-12)
    assert torch.equal(w, before)
