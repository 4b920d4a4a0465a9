"""Drop-in ``nn.Linear`` replacements whose weights live packed in buffers and run on pyshrink's ops.

Nothing here quantizes lazily: a layer is built already quantized (:meth:`QuantLinear.from_float`, or
by :func:`pyshrink.quantize`, or empty and then filled by ``load_state_dict``), ``forward`` is one op
call, and ``.to()`` only moves buffers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch.linears import in_features as _in_features
from ..arch.linears import weight_out_in
from ..ops.memory import in_hugepages
from ..ops.q4 import GROUP_SIZES
from .grid import dequantize_buffers


class _QuantBase(nn.Module):
    """Shared by the 4-bit and 8-bit layers: bias, the optional input scale, dtype-proof scales."""

    bits: int

    def _init_common(self, in_features, out_features, bias, input_scale, device, dtype):
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("input_scale", torch.ones(in_features, device=device, dtype=dtype) if input_scale else None)

    def _apply(self, fn, recurse=True):
        # ``scales`` are float32 by the layout's definition: a model-wide ``.half()`` or ``.to(bfloat16)``
        # must not round them. They travel as raw bytes, so device moves still apply and dtype casts do not.
        scales = self._buffers.pop("scales")
        try:
            return super()._apply(fn, recurse)
        finally:
            moved = fn(scales.view(torch.uint8))
            self._buffers["scales"] = moved.view(torch.float32) if moved.dtype == torch.uint8 else scales

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked against the layer's width (the 4-bit op sees only whole groups, so a wrong width that
        fills the same groups would pass it unnoticed) and scaled by ``input_scale`` in ``x``'s own dtype (a
        float32 scale on a bfloat16 model would promote the output and break the next layer)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, the layer takes "
                             f"{self.in_features}")
        return x if self.input_scale is None else x * self.input_scale.to(x.dtype)

    def buffers_dict(self) -> dict:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the buffers stand for (allocates; for inspection and tests).

        With an ``input_scale`` the layer computes ``(x * input_scale) @ W^T``; this returns ``W``.
        """
        return dequantize_buffers({k: v.cpu() for k, v in self.buffers_dict().items()}, self.in_features)

    @classmethod
    def concat_outputs(cls, layers) -> "_QuantBase":
        """One layer whose outputs are ``layers``' outputs side by side (``torch.cat`` of the buffers along
        the output rows; each output row is computed from its own rows of the buffers, so the numbers are the
        same as the separate layers'). For calling q|k|v or gate|up of a block as one op (fewer calls per
        decode step). Raises ``ValueError`` when the layers cannot share one call (different class, input
        width, group size, symmetry, mode, or input scale).
        """
        first = layers[0]
        for m in layers:
            if (type(m) is not type(first) or m.in_features != first.in_features
                    or m._call_settings() != first._call_settings()):
                raise ValueError(f"cannot concatenate {m.extra_repr()} with {first.extra_repr()}")
            if (m.input_scale is None) != (first.input_scale is None) or (
                    m.input_scale is not None and not torch.equal(m.input_scale, first.input_scale)):
                raise ValueError("cannot concatenate layers with different input scales")
            if (m.bias is None) != (first.bias is None):
                raise ValueError("cannot concatenate layers with and without a bias")
        bufs = {k: torch.cat([m.buffers_dict()[k] for m in layers]) for k in first.buffers_dict()}
        bias = None if first.bias is None else torch.cat([m.bias.detach() for m in layers])
        return cls.from_buffers(bufs, first.in_features, bias=bias, input_scale=first.input_scale,
                                fast=getattr(first, "fast", True))

    def streamed_buffers_to_hugepages(self) -> None:
        """Moves the weight codes (what a one-token step streams) into huge-page memory where that applies
        (:func:`pyshrink.ops.memory.in_hugepages`): called when a layer is built from buffers and after a
        saved model's buffers are loaded into its skeleton."""
        for name in self.STREAMED:
            self._buffers[name] = in_hugepages(self._buffers[name])

    def _call_settings(self) -> tuple:
        """What, besides the buffers, decides how the layer computes (equal for layers that share one call)."""
        return tuple(getattr(self, a, None) for a in ("group_size", "symmetric", "fast"))

    def _set_bias_and_scale(self, bias, input_scale):
        with torch.no_grad():
            if bias is not None:
                self.bias.copy_(bias)
            if input_scale is not None:
                self.input_scale.copy_(input_scale)


class QuantLinear(_QuantBase):
    """``nn.Linear`` with 4-bit group-wise weights, computed by ``torch.ops.pyshrink.linear_q4``.

    Buffers (ONNX Runtime MatMulNBits layout, see :mod:`pyshrink.ops.q4`): ``packed`` uint8
    ``[out, ceil(in/g), g/2]``, ``scales`` float32 ``[out, ceil(in/g)]``, ``zero_points`` uint8
    ``[out, ceil(ceil(in/g)/2)]`` (or ``[0]`` when symmetric); optional ``input_scale`` ``[in]`` (AWQ's
    per-input-channel scale where no preceding op could absorb it: the layer computes
    ``(x * input_scale) @ W^T``); ``bias`` stays a float parameter.

    ``fast`` (default True) chooses the op's mode for every call: activations quantized to int8 per
    block of ``g`` with integer dot products, or (False) float activations. Fast is the default at every
    batch size because it was the faster one at every size measured, single-token decoding included
    (AVX2 kernel, 2 threads, 576->1536: 73 us fast vs 156 us exact at M=1, 312 vs 440 us at M=4; the
    49152x576 head at M=1: 2.2 ms vs 9.4 ms), for +0.17% perplexity (SmolLM2-135M, RTN g64, 8k
    held-out WikiText-2 tokens: 41.06 fast vs 40.98 exact). Set ``fast = False`` on a layer for the
    float path.

    Recipe::

        import torch, pyshrink
        from pyshrink.quantize import QuantLinear

        layer = QuantLinear.from_float(torch.nn.Linear(576, 1536), group_size=64)   # round-to-nearest
        y = layer(torch.randn(2, 7, 576))

        # a whole model, activation-aware and error-compensating, then saved and reloaded:
        model, tok = pyshrink.load_model("smollm2-135m")
        pyshrink.quantize(model, bits=4, group_size=64, calibration="calib.txt", tokenizer=tok)
        pyshrink.save(model, tok, "out/smollm2-q4")
        model, tok = pyshrink.load_model("out/smollm2-q4")   # QuantLinear modules again
    """

    bits = 4
    STREAMED = ("packed",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 64,
                 symmetric: bool = True, input_scale: bool = False, fast: bool = True, device=None,
                 dtype=torch.float32):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"QuantLinear: group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {group_size!r}")
        self._init_common(in_features, out_features, bias, input_scale, device, dtype)
        self.group_size, self.symmetric, self.fast = group_size, symmetric, fast
        nb = -(-in_features // group_size)
        self.register_buffer("packed", torch.zeros(out_features, nb, group_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, nb, dtype=torch.float32, device=device))
        zp_shape = (0,) if symmetric else (out_features, (nb + 1) // 2)
        self.register_buffer("zero_points", torch.zeros(zp_shape, dtype=torch.uint8, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pyshrink.linear_q4(self._input(x), self.packed, self.scales, self.zero_points, self.bias,
                                            self.fast)

    def buffers_dict(self) -> dict:
        return {"packed": self.packed, "scales": self.scales, "zero_points": self.zero_points}

    @classmethod
    def from_buffers(cls, buffers: dict, in_features: int, bias=None, input_scale=None, fast: bool = True):
        packed = buffers["packed"]
        N, nb, half = packed.shape
        layer = cls(in_features, N, bias is not None, group_size=2 * half, symmetric=buffers["zero_points"].numel() == 0,
                    input_scale=input_scale is not None, fast=fast, device=packed.device,
                    dtype=bias.dtype if bias is not None else torch.float32)
        layer.packed, layer.scales, layer.zero_points = packed, buffers["scales"], buffers["zero_points"]
        layer._set_bias_and_scale(bias, input_scale)
        layer.streamed_buffers_to_hugepages()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Module, group_size: int = 64, symmetric: bool = True, fast: bool = True):
        """Round-to-nearest quantization of an ``nn.Linear`` (or GPT-2 ``Conv1D``) with the native op."""
        from ..ops import quantize_q4

        w = weight_out_in(linear).detach()
        packed, scales, zp = quantize_q4(w.contiguous(), group_size, symmetric)
        return cls.from_buffers({"packed": packed, "scales": scales, "zero_points": zp}, _in_features(linear),
                                bias=None if linear.bias is None else linear.bias.detach(), fast=fast)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits=4, group_size={self.group_size}, symmetric={self.symmetric}, fast={self.fast}"
                + (", input_scale=True" if self.input_scale is not None else ""))


class QuantLinear8(_QuantBase):
    """``nn.Linear`` with int8 weights, one float32 scale per output channel, on ``pyshrink.linear_q8``.

    Buffers (:mod:`pyshrink.ops.q8`): ``q`` int8 ``[out, in]``, ``scales`` float32 ``[out]``; optional
    ``input_scale`` as in :class:`QuantLinear`. Activations stay in floating point.

    Recipe::

        layer = QuantLinear8.from_float(torch.nn.Linear(576, 49152, bias=False))
        pyshrink.quantize(model, bits=8, calibration="calib.txt", tokenizer=tok)   # whole model
    """

    bits = 8
    STREAMED = ("q",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_scale: bool = False,
                 device=None, dtype=torch.float32, **_ignored):
        super().__init__()
        self._init_common(in_features, out_features, bias, input_scale, device, dtype)
        self.register_buffer("q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pyshrink.linear_q8(self._input(x), self.q, self.scales, self.bias)

    def buffers_dict(self) -> dict:
        return {"q": self.q, "scales": self.scales}

    @classmethod
    def from_buffers(cls, buffers: dict, in_features: int, bias=None, input_scale=None, fast: bool = True):
        q = buffers["q"]
        layer = cls(in_features, q.shape[0], bias is not None, input_scale=input_scale is not None, device=q.device,
                    dtype=bias.dtype if bias is not None else torch.float32)
        layer.q, layer.scales = q, buffers["scales"]
        layer._set_bias_and_scale(bias, input_scale)
        layer.streamed_buffers_to_hugepages()
        return layer

    @classmethod
    def from_float(cls, linear: nn.Module, **_ignored):
        """Round-to-nearest int8 quantization of an ``nn.Linear`` (or ``Conv1D``) with the native op."""
        from ..ops import quantize_q8

        q, scales = quantize_q8(weight_out_in(linear).detach().contiguous())
        return cls.from_buffers({"q": q, "scales": scales}, _in_features(linear),
                                bias=None if linear.bias is None else linear.bias.detach())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, bits=8"
                + (", input_scale=True" if self.input_scale is not None else ""))


QUANT_CLASSES = {4: QuantLinear, 8: QuantLinear8}


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _QuantBase)


def quant_layer(bits: int, buffers: dict, in_features: int, bias=None, input_scale=None, fast: bool = True) -> _QuantBase:
    return QUANT_CLASSES[bits].from_buffers(buffers, in_features, bias=bias, input_scale=input_scale, fast=fast)


def empty_layer(spec: dict, dtype=torch.float32, device=None) -> _QuantBase:
    """An empty layer of the shapes recorded in a transform (for loading saved weights into; on the meta device,
    for assigning them)."""
    cls = QUANT_CLASSES[spec["bits"]]
    return cls(spec["in"], spec["out"], spec["bias"], group_size=spec.get("group_size", 64),
               symmetric=spec.get("symmetric", True), input_scale=spec.get("input_scale", False),
               fast=spec.get("fast", True), dtype=dtype, device=device)


__all__ = ["QuantLinear", "QuantLinear8", "is_quantized", "quant_layer", "empty_layer"]
