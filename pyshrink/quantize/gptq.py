"""GPTQ (Frantar et al. 2022): quantize one column at a time and push its error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's output error.

``H = X^T X`` (the factor 2 cancels) from the calibration inputs, damped by ``damp * mean(diag H)``; the
upper Cholesky factor of ``H^-1`` gives every column's update row. Columns are processed in lazy batches
of ``block`` (the update to later batches is one matrix product). Group scales are computed when their
group is reached, from the weights as the earlier updates left them, with the clipping ratio that
minimizes the group's output error (as :func:`pyshrink.quantize.awq.search_clip` does). With
``act_order`` the columns go by decreasing ``diag(H)`` and the group scales are fixed up front (groups
must stay contiguous in K for the MatMulNBits layout); 8-bit rows are one group, also fixed up front.
"""
from __future__ import annotations

import torch

from .awq import clip_ratios, search_clip
from .grid import Grid
from .hessian import group_errors


def _group_params(w: torch.Tensor, grid: Grid, Hb: torch.Tensor, ratios: list[float]):
    """Scale and zero point ``[N]`` for one group ``w [N, g']`` with the best clipping ratio."""
    wg = w[:, None, :]
    best_err = best_r = None
    for r in ratios:
        err = group_errors(grid.fake(wg, r) - wg, Hb[None])[:, 0]
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(err, r), best_r)
    scale, zp = grid.params(wg, best_r[:, None])
    return scale[:, 0], zp[:, 0]


@torch.no_grad()
def gptq(w: torch.Tensor, H: torch.Tensor, grid: Grid, *, damp: float = 0.01, block: int = 128,
         act_order: bool = False, clip_n: int = 1, clip_lo: float = 1.0):
    """Quantize ``w [N, K]`` against ``H [K, K]``; returns ``(buffers, dequantized weight [N, K])``."""
    W = w.detach().float().clone()
    N, K = W.shape
    g, nb = grid.group_size, grid.blocks(K)
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ratios = clip_ratios(clip_n, clip_lo)

    static = act_order or grid.bits == 8
    scale = torch.zeros(N, nb, device=W.device)
    zp = torch.zeros(N, nb, device=W.device)
    if static:
        r = search_clip(W, grid, H, clip_n, clip_lo)
        scale, zp = grid.params(grid.grouped(W), r)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H_orig, H = W[:, perm], H, H[perm][:, perm]
    else:
        H_orig = H
    col_group = (perm if perm is not None else torch.arange(K, device=W.device)) // g
    col_group = col_group.tolist()

    H = H + damp * torch.diagonal(H).mean() * torch.eye(K, device=H.device, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    B = max(block, g) if static else max(g, block // g * g)  # dynamic groups must lie inside one batch
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            b = col_group[col]
            if not static and col % g == 0:
                e = min(col + g, K)
                scale[:, b], zp[:, b] = _group_params(W1[:, i:i + (e - col)], grid, H_orig[col:e, col:e], ratios)
            s, z = scale[:, b], zp[:, b]
            wcol = W1[:, i]
            q = grid.codes(wcol, s, z)
            Q[:, col] = q
            err = (wcol - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        if i2 < K:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    # codes for the zero padding beyond K are the zero points (they dequantize to 0, as the op's do)
    Qg = zp[:, :, None].expand(N, nb, g).clone()
    Qg.view(N, nb * g)[:, :K] = Q
    deq = grid.dequant(Qg, scale[..., None], zp[..., None]).view(N, nb * g)[:, :K]
    return grid.to_buffers(Qg, scale, zp), deq
