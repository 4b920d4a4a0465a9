"""Attention over the filled prefix of a static KV cache: ``pyshrink::filled_attention``.

A compiled decoding step has fixed shapes, so it hands this op the whole static cache together with the number
of positions the mask keeps (a tensor, computed inside the graph); the op slices the cache to them at run time.
Its one implementation is torch's SDPA on the slice (``CompositeExplicitAutograd``): the op exists for the
boundary, not for a kernel of its own. Reading the length is a device-to-host copy, free on the CPU but a sync
per layer on a GPU, so pyshrink's attention uses the op on CPU tensors only (:mod:`pyshrink.runtime.attention`).

Defined through ``torch.library.Library`` rather than ``torch.library.custom_op``, whose Python wrapper cost
about 35 us a call against 9 here (development measurement, this 2-core VM), which a step pays once per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._lib import check, define

OP = define("filled_attention(Tensor query, Tensor key, Tensor value, Tensor mask, Tensor length, float? scale=None)"
            " -> Tensor")


@torch.library.impl(OP, "CompositeExplicitAutograd")
def _filled_attention(query, key, value, mask, length, scale=None):
    L = key.shape[-2]
    check(length.numel() == 1 and not length.is_floating_point(), "filled_attention",
          f"length must be one integer, got a {tuple(length.shape)} {length.dtype} tensor")
    n = int(length)
    check(0 <= n <= L, "filled_attention", f"length {n} is outside 0..{L} (the cache's positions)")
    n = n or L  # nothing kept: the whole cache, as SDPA would attend under that mask
    out = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], attn_mask=mask[..., :n], scale=scale)
    return out.contiguous()  # SDPA's layout varies by backend; the fake promises a contiguous one


@torch.library.register_fake(OP)
def _fake(query, key, value, mask, length, scale=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def kept_length(mask: torch.Tensor) -> torch.Tensor:
    """1 + the last position ``mask`` (bool, True = attend; or additive float, -inf = masked) keeps in any row;
    0 if none. An additive mask that masks with a finite minimum instead of -inf keeps every position: exact,
    but nothing is skipped. Plain tensor arithmetic, so that inside a compiled graph it fuses into the graph's
    own loops."""
    keep = mask if mask.dtype == torch.bool else mask > float("-inf")
    cols = keep.reshape(-1, keep.shape[-1]).any(0)
    return (cols * torch.arange(1, cols.numel() + 1, device=cols.device)).amax()


def filled_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """SDPA of ``query [b, heads, q, d]`` over ``key``/``value [b, heads, L, d]`` under ``mask`` (broadcast to
    ``[b, heads, q, L]``), reading only the positions up to the last one the mask keeps for any row: the
    positions after it add nothing to any row's softmax."""
    return torch.ops.pyshrink.filled_attention(query, key, value, mask, kept_length(mask), scale)
