"""Quantization methods, registered by name: ``METHODS[name]`` is an object with

* ``needs_data``: whether it needs calibration activations (the ``H`` of every layer);
* ``searches_scales``: whether the driver runs AWQ's per-input-channel scale search (and fold) first;
* ``resolve(has_data)``: the method that actually runs (``auto`` falls back to ``rtn`` without data);
* ``quantize(w, H, grid, cfg) -> (buffers, dequantized weight, label)`` for one layer.

Adding a method is one class with :func:`register_method`; the driver (:mod:`pyshrink.quantize.api`)
knows none of them by name.
"""
from __future__ import annotations

import torch

from .awq import search_clip
from .grid import Grid
from .gptq import gptq
from .hessian import output_error

METHODS: dict = {}


def register_method(cls):
    METHODS[cls.name] = cls()
    return cls


class Method:
    name = ""
    needs_data = False
    searches_scales = False

    def resolve(self, has_data: bool) -> "Method":
        return self

    def quantize(self, w: torch.Tensor, H, grid: Grid, cfg):
        raise NotImplementedError


@register_method
class RTN(Method):
    """Round to nearest with the native ``quantize_q4`` / ``quantize_q8`` ops: the data-free baseline."""

    name = "rtn"

    def quantize(self, w, H, grid, cfg):
        from ..ops import dequantize_q4, quantize_q4, quantize_q8

        w = w.detach().contiguous()
        if grid.bits == 8:
            q, scales = quantize_q8(w)
            return {"q": q, "scales": scales}, q.float() * scales[:, None], "rtn"
        packed, scales, zp = quantize_q4(w, grid.group_size, grid.symmetric)
        return ({"packed": packed, "scales": scales, "zero_points": zp},
                dequantize_q4(packed, scales, zp, w.shape[1]), "rtn")


@register_method
class AWQ(Method):
    """Activation-aware scales (searched by the driver) + per-group clipping search, then rounding."""

    name = "awq"
    needs_data = True
    searches_scales = True

    def quantize(self, w, H, grid, cfg):
        ratio = search_clip(w.float(), grid, H, cfg.clip_grid, cfg.clip_min)
        return grid.quantize(w.float(), ratio), grid.fake_weight(w.float(), ratio), "awq-clip"


@register_method
class GPTQ(Method):
    """Error-compensating column-by-column quantization with clipping-searched group scales."""

    name = "gptq"
    needs_data = True

    def quantize(self, w, H, grid, cfg):
        buffers, deq = gptq(w, H, grid, damp=cfg.damp, block=cfg.gptq_block, act_order=cfg.act_order,
                            clip_n=cfg.clip_grid, clip_lo=cfg.clip_min)
        return buffers, deq, "gptq"


@register_method
class Auto(Method):
    """AWQ scales, then per layer whichever of round-to-nearest, AWQ's clipped rounding and GPTQ has the
    lowest output error on the calibration data; round-to-nearest when there is no data.

    Round-to-nearest is always a candidate, so no layer ends up with a larger calibration output error
    than plain rounding of the same (scaled) weights: clipping is chosen per group with only part of
    ``H`` (its diagonal at 8 bits) and GPTQ can lose to plain rounding on a layer, and the exact error of
    every candidate is cheap next to producing it.
    """

    name = "auto"
    needs_data = False
    searches_scales = True
    candidates = ("rtn", "awq", "gptq")

    def resolve(self, has_data):
        return self if has_data else METHODS["rtn"]

    def quantize(self, w, H, grid, cfg):
        best = None
        for name in self.candidates:
            buffers, deq, label = METHODS[name].quantize(w, H, grid, cfg)
            err = float(output_error(deq - w.float(), H))
            if best is None or err < best[0]:
                best = (err, buffers, deq, label)
        return best[1], best[2], best[3]
