"""Activation-aware weight quantization (AWQ, Lin et al. 2023): per-input-channel scales and clipping.

Scaling. A few input channels carry much larger activations than the rest, and errors in their weights
cost the most. Multiplying weight column ``k`` by ``s_k`` (and the input by ``1/s_k``, which leaves the
float layer unchanged) makes those columns' relative rounding error smaller. For a group of layers that
read the same input, ``s = mean|x|^a / wstat^(1-a)`` (``wstat``: mean over output rows of
``|w| / max|w|`` of each group, as AutoAWQ's "duo" scaling) is searched over ``a`` in ``[0, 1)``, plus
``s = 1``; each candidate is scored by the group's exact squared output error on the calibration data
(:mod:`pyshrink.quantize.hessian`) after round-to-nearest quantization, and the best one kept.

Clipping. For each output row and group, the largest magnitude is shrunk by a ratio from 1.0 down to
``clip_min`` when that lowers the group's output error (outliers in the weights stretch the grid for
everyone else).
"""
from __future__ import annotations

import torch

from .grid import Grid
from .hessian import diagonal_blocks, group_errors, output_error


def weight_stat(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel: mean over all output rows of ``|w| / max|w|`` within each group ``[K]``."""
    rows = []
    for w in weights:
        N, K = w.shape
        g = min(group_size, K)
        nb = -(-K // g)
        wp = torch.zeros(N, nb * g, dtype=torch.float32, device=w.device)
        wp[:, :K] = w.abs()
        wg = wp.view(N, nb, g)
        rows.append((wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).view(N, -1)[:, :K])
    return torch.cat(rows).mean(0)


def scale_candidates(x_mean: torch.Tensor, w_stat: torch.Tensor, n_grid: int):
    """``s = 1`` first, then AutoAWQ's duo scales for ``a = 0, 1/n, ..., (n-1)/n``, normalized to geometric mean 1."""
    yield torch.ones_like(x_mean)
    x = x_mean.float().clamp(min=1e-8)
    w = w_stat.float()
    for i in range(n_grid):
        a = i / n_grid
        s = (x.pow(a) / (w.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        yield s / (s.max() * s.min()).sqrt()


def search_scale(weights: list[torch.Tensor], grids: list[Grid], H: torch.Tensor, x_mean: torch.Tensor,
                 n_grid: int):
    """Best per-input-channel scale ``s [K]`` for layers sharing one input.

    Returns ``(s, err_best, err_unscaled)``; ``s`` is all ones when scaling does not help.
    """
    w_stat = weight_stat(weights, grids[0].group_size)
    best, best_err, base_err = None, None, None
    for s in scale_candidates(x_mean, w_stat, n_grid):
        err = 0.0
        for w, grid in zip(weights, grids):
            delta = grid.fake_weight(w * s) / s - w
            err += float(output_error(delta, H))
        if base_err is None:
            base_err = err
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best, best_err, base_err


def clip_ratios(n: int, lo: float) -> list[float]:
    return [1.0 - (1.0 - lo) * i / max(n - 1, 1) for i in range(n)] if n > 1 else [1.0]


def search_clip(w: torch.Tensor, grid: Grid, H: torch.Tensor, n: int, lo: float) -> torch.Tensor:
    """Clipping ratio ``[N, nb]`` per output row and group minimizing each group's output error."""
    wg = grid.grouped(w)
    if grid.bits == 4:
        Hb, Hd = diagonal_blocks(H, grid.group_size), None
    else:  # one group per row: the diagonal approximation (a full block would be N*K^2 per ratio)
        Hb, Hd = None, grid.grouped(torch.diagonal(H)[None])[0]
    best_err, best_ratio = None, None
    for r in clip_ratios(n, lo):
        err = group_errors(grid.fake(wg, r) - wg, Hb, Hd)
        if best_err is None:
            best_err, best_ratio = err, torch.full_like(err, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, r), best_ratio)
    return best_ratio
