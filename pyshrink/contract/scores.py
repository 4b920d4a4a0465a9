"""Which channels of a layer to remove, and what the kept ones must become so the layer's output survives.

A *channel group* is the unit that is removed together: one MLP neuron (a column of the down projection),
or one attention head (``head_dim`` columns of the output projection). Everything here works on the
output projection ``W [out, C]`` that reads the channels, the bias ``b [out]`` (or None) and the
calibration statistics of its input ``x [tokens, C]`` (:class:`~pyshrink.contract.calibration.ChannelStats`).

Criteria (``CRITERIA``, chosen by name) return the groups to remove:

- ``"fluctuation"`` (the default): FLAP's criterion, the variance of the channel over the calibration tokens
  times the squared norm of its output weights. With the least-squares refit below it is as good as OBS on
  SmolLM2 (perplexity within 0.2 %) at a tenth of the planning time.
- ``"obs"``: Optimal-Brain-Surgeon-style greedy removal on the augmented input Gram matrix
  ``H = E[[x, 1][x, 1]^T]``: the group whose removal, after the kept channels and the bias are re-solved by
  least squares, changes the layer output least goes first, and ``H^-1`` and ``W`` are updated after each
  step so later choices see the compensation of earlier ones.
- ``"magnitude"``: the norm of the channel's output weights (no data).

:func:`refit` then gives the kept channels' new weights and the bias: ``"lstsq"`` solves
``min E||[x_K, 1] W'^T - (x W^T + b)||^2`` (the least-squares reconstruction of the full output from the kept
channels, ridge-damped), ``"mean"`` only folds the removed channels' mean contribution into the bias
(FLAP's compensation), ``"none"`` slices. The refit and the errors read the statistics' Gram matrix, or, while
they hold the calibration tokens themselves (fewer than half as many as channels), the tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import calibration
from .calibration import ChannelStats, float64_bands, row_bands

DAMP = 1e-2  # ridge damping, relative to the mean diagonal of H (as GPTQ's percdamp)


@dataclass
class Layer:
    """One channel-reading projection and what is known about its input."""
    # [out, C] in the projection's own dtype, on the CPU: read-only (it may be the module's own tensor), read in
    # float64 a band or a gather at a time (a float64 copy of a 70 B model's down projection is 1.75 GiB)
    weight: torch.Tensor
    bias: torch.Tensor | None  # [out] float64
    stats: ChannelStats | None
    group: int = 1  # channels per removable group (head_dim for heads)
    extra_norms: torch.Tensor | None = None  # [C/group] norms of the weights that WRITE each group (gate/up rows)

    @property
    def groups(self) -> int:
        return self.weight.shape[1] // self.group

    def hessian(self, damp: float = DAMP) -> torch.Tensor:
        """Augmented, damped second moment ``E[[x,1][x,1]^T] + damp * mean(diag) * I`` (float64, a new tensor)."""
        H = self.moment().clone()
        if damp:
            H.diagonal()[:-1].add_(damp * H.diagonal()[:-1].mean().clamp_min(1e-12))
        return H

    def moment(self) -> torch.Tensor:
        """The undamped augmented second moment (cached; do not modify)."""
        if getattr(self, "_h", None) is None:
            self._h = self._moment()
        return self._h

    def _moment(self) -> torch.Tensor:
        s = self.stats
        n = max(s.n, 1.0)
        C = self.weight.shape[1]
        H = torch.empty(C + 1, C + 1, dtype=torch.float64)
        H[:C, :C] = s.gram / n
        H[:C, C] = H[C, :C] = s.mean
        H[C, C] = 1.0
        return H

    def augmented_weight(self) -> torch.Tensor:
        b = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], dtype=torch.float64)
        return torch.cat([self.weight.to(torch.float64), b[:, None]], 1)


def _channels(groups: torch.Tensor, size: int) -> torch.Tensor:
    return (groups[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


# ---- criteria ------------------------------------------------------------------------------------------

def _column_sq_sums(w: torch.Tensor) -> torch.Tensor:
    """``w.pow(2).sum(0)`` in float64, a band of rows at a time: the whole square was a temporary of ``w``'s size
    (1.75 GiB for a 70 B model's down projection in float64). Bit for bit the same as whole for up to GRAM_ROWS
    rows."""
    total = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    for _, _, band in float64_bands(w):
        total += band.pow_(2).sum(0)
    return total


def magnitude(layer: Layer, n_remove: int) -> torch.Tensor:
    norms = _column_sq_sums(layer.weight).view(layer.groups, layer.group).sum(1).sqrt()
    if layer.extra_norms is not None:
        norms = norms * layer.extra_norms
    return norms.argsort()[:n_remove]


def fluctuation(layer: Layer, n_remove: int) -> torch.Tensor:
    """FLAP: per channel, sample variance of the input times the squared norm of its output weights."""
    score = layer.stats.variance * _column_sq_sums(layer.weight)
    return score.view(layer.groups, layer.group).sum(1).argsort()[:n_remove]


def obs(layer: Layer, n_remove: int, *, steps: int = 16, bucket: torch.Tensor | None = None,
        per_bucket: int | None = None) -> torch.Tensor:
    """Greedy structured OBS: remove groups in ``steps`` chunks, re-solving the kept weights after each.

    The cost of removing group ``S`` alone is ``tr(W_S (Hinv_SS)^-1 W_S^T)``; after a chunk is removed,
    ``W`` absorbs the optimal compensation and ``Hinv`` becomes the inverse over the remaining channels
    (the removed rows and columns become zero). With ``bucket`` (a bucket id per group) at most
    ``per_bucket`` groups of each bucket are removed, one group per step (GQA: heads inside kv groups).
    """
    g, G = layer.group, layer.groups
    # float32 is enough to rank (the kept weights are re-solved in float64 by :func:`refit`)
    Hinv = torch.linalg.inv(layer.hessian()).float()
    W = layer.augmented_weight().float()
    alive = torch.ones(G, dtype=torch.bool)
    removed = []
    chunk = max(1, -(-n_remove // steps)) if bucket is None else 1
    taken = None if bucket is None else torch.zeros(int(bucket.max()) + 1, dtype=torch.long)
    done = 0
    while done < n_remove:
        if g == 1:
            cost = W[:, :-1].pow(2).sum(0) / Hinv.diagonal()[:-1].clamp_min(1e-30)
        else:
            blocks = Hinv[:-1, :-1].reshape(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, g, g]
            blocks = blocks + torch.diag_embed((~alive).float()[:, None].expand(G, g))  # removed: identity
            Wg = W[:, :-1].reshape(-1, G, g).permute(1, 0, 2)  # [G, out, g]
            cost = ((Wg @ torch.linalg.inv(blocks)) * Wg).sum((1, 2))
        cost[~alive] = float("inf")
        if taken is not None:
            cost[taken[bucket] >= per_bucket] = float("inf")
        k = min(chunk, n_remove - done)
        pick = cost.argsort()[:k]
        if taken is not None:
            taken[bucket[pick]] += 1
        S = _channels(pick, g)
        HS = Hinv[S]  # [|S|, C+1]; Hinv is symmetric, so Hinv[:, S] = HS.T
        row = torch.linalg.solve(HS[:, S], HS)
        W -= W[:, S] @ row
        Hinv -= HS.T @ row
        W[:, S] = 0
        alive[pick] = False
        removed.append(pick)
        done += k
    return torch.cat(removed)


CRITERIA = {"fluctuation": fluctuation, "obs": obs, "magnitude": magnitude}


# ---- refit ---------------------------------------------------------------------------------------------

def kept_groups(layer: Layer, removed: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(layer.groups, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().squeeze(1)


def refit(layer: Layer, keep: torch.Tensor, mode: str = "lstsq", *, damp: float = DAMP):
    """New ``(weight [out, K], bias [out] or None)`` for the kept groups ``keep`` (group indices)."""
    return _refit(layer, keep, mode, damp, with_error=False)[:2]


def refit_with_error(layer: Layer, keep: torch.Tensor, mode: str = "lstsq", *, damp: float = DAMP):
    """:func:`refit`'s ``(weight, bias)`` and their :func:`output_error` (NaN without statistics), as a triple.

    For ``"lstsq"`` the error comes from the normal equations the refit solves, without :func:`output_error`'s
    product of the whole Gram matrix (which the other modes use)."""
    return _refit(layer, keep, mode, damp, with_error=True)


def _refit(layer: Layer, keep: torch.Tensor, mode: str, damp: float, *, with_error: bool):
    K = _channels(keep, layer.group)
    if mode not in ("lstsq", "mean", "none"):
        raise ValueError(f"refit mode must be one of lstsq, mean, none; got {mode!r}")
    measured = layer.stats is not None
    if mode == "lstsq" and measured:
        if layer.stats.samples is not None:
            return _lstsq_samples(layer, K, damp)
        return _lstsq(layer, K, damp, with_error=with_error)
    w, b = layer.weight[:, K].to(torch.float64), (layer.bias.clone() if layer.bias is not None else None)
    if mode == "mean" and measured:  # FLAP's compensation: the removed channels' mean output, in the bias
        removed = torch.ones(layer.weight.shape[1], dtype=torch.bool)
        removed[K] = False
        b = b if b is not None else torch.zeros(layer.weight.shape[0], dtype=torch.float64)
        b += layer.weight[:, removed].to(torch.float64) @ layer.stats.mean[removed]
    return w, b, (output_error(layer, keep, w, b) if with_error and measured else float("nan"))


def _lstsq(layer: Layer, K: torch.Tensor, damp: float, *, with_error: bool):
    """Least-squares refit of the kept channels ``K`` and the bias, and its output error (NaN without ``with_error``).

    With ``z = [x_K, 1]``, ``y = W x + b``, ``A0 = E[z z^T]``, ``R = E[z y^T]`` and the damped ``A = A0 + L``
    (``L = lam I`` on the channels' part), the refit is ``S = A^-1 R`` (``[W'  b']^T``), and its error
    ``E||S^T z - y||^2 = E||y||^2 - 2 tr(S^T R) + tr(S^T A0 S) = E||y||^2 - tr(S^T R) - lam ||S_K||^2``.
    Everything is read from the Gram matrix ``G`` band by band (never a copy of it, nor of its kept rows: 1.5 GB and
    0.8 GB for a 13824-wide MLP, 6.6 GB and 3.3 GB for a 28672-wide one): the rows of the kept channels give ``A0``
    and ``R``; ``E||y||^2`` needs ``tr(W G W^T)``, whose kept rows are those of ``R``, so only the removed
    channels' block ``G_RR`` is multiplied again, half of it (``G`` is symmetric). That is ``k C + r^2 / 2``
    multiply-adds per output against the ``k C + C^2`` of :func:`refit` followed by :func:`output_error`.
    """
    s, W = layer.stats, layer.weight
    out, C = W.shape
    n, k = max(s.n, 1.0), len(K)
    G = s.gram
    keep_mask = torch.zeros(C, dtype=torch.bool)
    keep_mask[K] = True
    Rm = (~keep_mask).nonzero().squeeze(1)
    b = layer.bias if layer.bias is not None else torch.zeros(out, dtype=torch.float64)
    Wt = W.T.contiguous()  # rows gathered from the transpose: a column gather of W is twice as slow
    WKt, WRt = Wt.index_select(0, K).to(torch.float64), Wt.index_select(0, Rm).to(torch.float64)  # [k, out], [r, out]
    del Wt
    A, rhs, cross = _kept_rows(G, n, K, Rm, WKt, WRt)
    kk_cross = _dot(rhs[:k], WKt)  # tr(W_K G_K: W^T) / n = tr(W_K G_KK W_K^T) / n + cross
    Wm = WKt.T @ s.mean[K] + WRt.T @ s.mean[Rm]  # E[W x]
    # E||y||^2
    y_sq = kk_cross + cross + _removed_block(G, n, Rm, WRt) + 2 * b @ Wm + b @ b if with_error else None
    del WKt, WRt  # before the factorization, the other peak
    mK = s.mean[K]
    A[:k, k] = A[k, :k] = mK
    A[k, k] = 1.0
    lam = damp * A.diagonal()[:-1].mean().clamp_min(1e-12)
    A.diagonal()[:-1].add_(lam)
    rhs[:k].addr_(mK, b)
    rhs[k] = Wm + b
    # A is positive definite (its Schur complement is the kept channels' covariance + lam I): Cholesky, at half an
    # LU's cost; a factorization that fails (lam too small for a degenerate Gram matrix) falls back to LU. A is freed
    # before the solves, which are two triangular ones: cholesky_solve would copy the factor first (a peak of three
    # A-sized matrices and two rhs-sized ones, 6.4 GB for a 28672-wide MLP with half its neurons kept).
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        del A
        S = torch.linalg.solve_triangular(L, rhs, upper=False)
        S = torch.linalg.solve_triangular(L.mT, S, upper=True)  # [k + 1, out]
    else:
        S = torch.linalg.solve(A, rhs)
        del A
    del L
    err = float((y_sq - _dot(S, rhs) - lam * _dot(S[:k], S[:k])).clamp_min(0)) if with_error else float("nan")
    S = S.T
    return S[:, :-1].contiguous(), S[:, -1].contiguous(), err


def _lstsq_samples(layer: Layer, K: torch.Tensor, damp: float):
    """:func:`_lstsq` from the held calibration tokens ``X [T, C]`` instead of their Gram matrix: the same refit and
    error, at about ``T (C + k + T)`` multiply-adds per output instead of ``k C + k^2 + r^2 / 2``, for ``T`` below
    ``C / 2`` (see calibration.SAMPLES_PER_CHANNEL).

    The bias is unpenalized, so the refit is ridge regression on centered data, ``B = (Xc_K^T Xc_K + n lam I)^-1
    Xc_K^T Yc`` with ``Yc = Xc W^T``, plus ``b' = E[y] - B^T E[x_K]``. Solved in token space (the push-through
    identity): ``B = Xc_K^T Q`` with ``Q = (Xc_K Xc_K^T + n lam I)^-1 Yc``, a ``T x T`` system; its residual is
    ``Xc_K B - Yc = -n lam Q``, so the output error is ``n lam^2 ||Q||^2`` (no difference of large numbers).
    ``lam`` is the same as :func:`_lstsq`'s: ``damp`` times the mean of ``E[x_j^2]`` over the kept channels."""
    s, W = layer.stats, layer.weight
    X = s.samples
    T, out = X.shape[0], W.shape[0]
    m = s.mean  # act_stats_'s float64 sums of these same tokens
    XK = X[:, K].double().sub_(m[K])  # [T, k], centered
    lam = damp * s.mean_sq[K].mean().clamp_min(1e-12)
    Yc = torch.empty(T, out, dtype=torch.float64)
    Wm = torch.empty(out, dtype=torch.float64)  # E[W x]
    rows = calibration.band_rows(X.shape[1])
    Xbuf = torch.empty(min(rows, T), X.shape[1], dtype=torch.float64)
    for o0, o1, Wo in float64_bands(W, size=rows):  # Xc W^T by bands of outputs and tokens: no float64 X or W
        torch.mv(Wo, m, out=Wm[o0:o1])
        for t0, t1, Xc in float64_bands(X, Xbuf, rows):
            torch.matmul(Xc.sub_(m), Wo.T, out=Yc[t0:t1, o0:o1])
    del Wo, Xc, Xbuf  # the loop's last bands would keep their buffers alive through the solve
    M = XK @ XK.T
    M.diagonal().add_(T * lam)
    L, info = torch.linalg.cholesky_ex(M)  # positive definite: lam > 0
    if int(info) == 0:  # M and Yc freed as soon as they are used (M and L are 1.6 GB each at 14336 tokens)
        del M
        Z = torch.linalg.solve_triangular(L, Yc, upper=False)
        del Yc
        Q = torch.linalg.solve_triangular(L.mT, Z, upper=True)
        del Z
    else:
        Q = torch.linalg.solve(M, Yc)
        del M, Yc
    del L
    w = Q.T @ XK  # [out, k] = B^T, row-major
    b = Wm - w @ m[K]
    if layer.bias is not None:
        b += layer.bias
    return w, b, float(T * lam ** 2 * _dot(Q, Q))


def _kept_rows(G, n, K, Rm, WKt, WRt):
    """From the kept channels' rows of ``G``, a band at a time: ``A0``'s channel block (in ``A [k+1, k+1]``, the
    rest unset), ``E[x_K y^T]`` without the bias (in ``rhs [k+1, out]``, its last row unset) and
    ``tr(W_K G_KR W_R^T) / n``."""
    k = len(K)
    A = torch.empty(k + 1, k + 1, dtype=torch.float64)
    rhs = torch.empty(k + 1, WKt.shape[1], dtype=torch.float64)
    cross = torch.zeros((), dtype=torch.float64)
    for r0, r1 in row_bands(k):
        rows = G.index_select(0, K[r0:r1]).div_(n)  # E[x_Kc x^T]  [c, C]
        A[r0:r1, :k] = rows_k = rows[:, K]
        part = rows[:, Rm] @ WRt  # E[x_Kc x_R^T] W_R^T
        cross += _dot(part, WKt[r0:r1])
        torch.addmm(part, rows_k, WKt, out=rhs[r0:r1])
    return A, rhs, cross


def _removed_block(G, n, Rm, WRt) -> torch.Tensor:
    """``tr(W_R G_RR W_R^T) / n`` from the blocks of ``G_RR`` on and right of its diagonal, a band at a time."""
    rr = torch.zeros((), dtype=torch.float64)
    r = len(Rm)
    for r0, r1 in row_bands(r):
        band = G.index_select(0, Rm[r0:r1]).index_select(1, Rm[r0:]).div_(n)  # [c, r - r0]
        c = r1 - r0
        rr += _dot(band[:, :c] @ WRt[r0:r1], WRt[r0:r1])
        if r1 < r:  # the block right of the diagonal stands for its mirror image too
            rr += 2 * _dot(band[:, c:] @ WRt[r1:], WRt[r0:r1])
    return rr


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) of two same-shape matrices, a band of rows at a time: no temporary of their size, neither their
    product nor a row-major copy (the solvers return column-major solutions)."""
    total = torch.zeros((), dtype=torch.float64)
    for r0, r1 in row_bands(a.shape[0]):
        total += torch.vdot(a[r0:r1].reshape(-1), b[r0:r1].reshape(-1))
    return total


def output_error(layer: Layer, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """E||y_new - y||^2 per token on the calibration inputs (closed form from the Gram matrix):
    ``E||D x + d||^2 = tr(D E[x x^T] D^T) + 2 d^T D E[x] + ||d||^2`` for the weight change ``D`` and bias change
    ``d``."""
    s = layer.stats
    D = layer.weight.to(torch.float64, copy=True)
    D[:, _channels(keep, layer.group)] -= weight
    d = layer.bias.clone() if layer.bias is not None else torch.zeros(D.shape[0], dtype=torch.float64)
    if bias is not None:
        d -= bias
    X = s.samples
    if X is not None:  # from the tokens themselves, a band at a time (T C multiply-adds per output, not C^2)
        err = torch.zeros((), dtype=torch.float64)
        for _, _, Xb in float64_bands(X, size=calibration.band_rows(X.shape[1])):
            err += torch.addmm(d, Xb, D.T).pow_(2).sum()
        return float(err / X.shape[0])
    DG = D @ s.gram
    err = (DG * D).sum() / max(s.n, 1.0)
    del DG
    err += 2 * d @ (D @ s.mean) + d @ d
    return float(err.clamp_min(0))
