"""8-bit symmetric per-output-channel weights, for the layers or models where 4 bits cost too much.

Layout: ``q`` int8 ``[N, K]``, ``scales`` float32 ``[N]``; ``w[n, k] = q[n, k] * scales[n]``.
Quantization: ``scale = max|w[n, :]| / 127``, ``q = clamp(round(w / scale), -127, 127)`` (round half to
even, float32; a zero row gives scale 0 and q 0). The linear keeps activations in floating point.
"""
from __future__ import annotations

import torch

from ._lib import check, define, reference
from .q4 import FLOAT_DTYPES, _check_linear

QUANTIZE = define("quantize_q8(Tensor w) -> (Tensor, Tensor)")
LINEAR = define("linear_q8(Tensor x, Tensor q, Tensor scales, Tensor? bias) -> Tensor")


def _check_quantize(w):
    op = "quantize_q8"
    check(w.dim() == 2, op, f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    check(w.dtype in FLOAT_DTYPES, op, f"w must be float32, float16 or bfloat16, got {w.dtype}")
    check(w.shape[0] > 0 and w.shape[1] > 0, op, f"w must be non-empty, got shape {tuple(w.shape)}")


def _check_weights(op, q, scales):
    check(q.dtype == torch.int8 and q.dim() == 2, op, f"q must be int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    check(scales.dtype == torch.float32 and tuple(scales.shape) == (q.shape[0],), op,
          f"scales must be float32 [{q.shape[0]}], got {scales.dtype} {tuple(scales.shape)}")
    check(q.device == scales.device, op, "q and scales must share a device")


@reference(QUANTIZE)
def quantize_q8_reference(w):
    wf = w.float()
    scales = wf.abs().amax(1) / 127.0
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.clamp(torch.round(wf / safe[:, None]), -127, 127).to(torch.int8)
    return q, scales


@reference(LINEAR)
def linear_q8_reference(x, q, scales, bias):
    K = x.shape[-1]
    y = x.reshape(-1, K).double() @ (q.double() * scales.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


@torch.library.register_fake(QUANTIZE)
def _quantize_fake(w):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.register_fake(LINEAR)
def _linear_fake(x, q, scales, bias):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


def quantize_q8(w: torch.Tensor):
    """Quantize ``w [N, K]`` to int8 per output channel: returns ``(q int8 [N, K], scales float32 [N])``."""
    _check_quantize(w)
    return torch.ops.pyshrink.quantize_q8(w)


def linear_q8(x, q, scales, bias=None) -> torch.Tensor:
    """``x [..., K] @ (q * scales[:, None])^T (+ bias)``; output has ``x``'s dtype."""
    _check_weights("linear_q8", q, scales)
    _check_linear("linear_q8", x, q.device, q.shape[1], bias, q.shape[0])
    return torch.ops.pyshrink.linear_q8(x, q, scales, bias)
