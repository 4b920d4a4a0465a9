"""Activation statistics: per-channel sum |x|, sum x, sum x^2 and the token count, in one pass.

This is what calibration hooks call on every forward, so it accumulates in place into float64 buffers
(float32 sums over 10^5+ tokens lose the small channels the pruning scores care about).
"""
from __future__ import annotations

import math

import torch

from ._lib import check, define, reference

OP = define("act_stats_(Tensor x, Tensor(a!) acc, Tensor(b!) count) -> ()")


@reference(OP)
def act_stats_reference(x: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> None:
    """float64 math: acc[0] += sum|x|, acc[1] += sum x, acc[2] += sum x^2 over all leading dims."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(torch.float64)  # rows counted even when C = 0
    acc[0] += x2.abs().sum(0)
    acc[1] += x2.sum(0)
    acc[2] += (x2 * x2).sum(0)
    count += x2.shape[0]


@torch.library.register_fake(OP)
def _fake(x, acc, count):
    return None


def validate(x: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> None:
    op = "act_stats_"
    check(x.dim() >= 1, op, f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), op,
          f"x must be float32, float16 or bfloat16, got {x.dtype}")
    C = x.shape[-1]
    check(acc.dtype == torch.float64 and tuple(acc.shape) == (3, C), op,
          f"acc must be float64 of shape (3, {C}), got {acc.dtype} {tuple(acc.shape)}")
    check(count.dtype == torch.float64 and tuple(count.shape) == (1,), op,
          f"count must be float64 of shape (1,), got {count.dtype} {tuple(count.shape)}")
    check(x.device == acc.device == count.device, op,
          f"x, acc and count must be on one device, got {x.device}, {acc.device}, {count.device}")
    check(acc.is_contiguous(), op, "acc must be contiguous")


def new_accumulators(channels: int, device=None):
    """Zeroed (acc [3, C], count [1]) float64 buffers for :func:`act_stats_`."""
    return (torch.zeros(3, channels, dtype=torch.float64, device=device),
            torch.zeros(1, dtype=torch.float64, device=device))


def act_stats_(x: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> None:
    """Accumulate statistics of ``x [..., C]`` into ``acc [3, C]`` (sum|x|, sum x, sum x^2) and ``count [1]``.

    All accumulators are float64 and updated in place; ``x`` may be any float dtype and need not be
    contiguous.
    """
    validate(x, acc, count)
    torch.ops.pyshrink.act_stats_(x, acc, count)
