"""Projection weights as ONNX initializers: float ``MatMul`` or 4-bit ``com.microsoft::MatMulNBits``.

A projection that pyshrink already quantized (a ``QuantLinear``: buffers ``packed``/``scales``/
``zero_points``) is exported by *copying its bytes*: the canonical layout of :mod:`pyshrink.ops.q4` is
MatMulNBits' layout, so nothing is re-quantized. A float projection stays float, or, with ``int4=True``,
is quantized once with round-to-nearest through :func:`pyshrink.ops.quantize_q4`; the dequantized weight is
remembered so validation can compare against a PyTorch model that computes with exactly those weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..arch.linears import is_conv1d, weight_out_in
from ..errors import InvalidSetting
from .graph import MS, Graph, to_numpy


def is_quantized(module) -> bool:
    """A pyshrink QuantLinear (``packed``/``scales``/``zero_points``) or QuantLinear8 (``q``/``scales``)."""
    return hasattr(module, "scales") and (hasattr(module, "packed") or hasattr(module, "q"))


@dataclass
class Proj:
    """One ``y = x @ W^T + b`` with ``W [N, K]``: float weight, or 4-bit MatMulNBits bytes."""
    N: int
    K: int
    bias: torch.Tensor | None
    weight: torch.Tensor | None = None  # float [N, K]
    packed: torch.Tensor | None = None  # uint8 [N, nb, g/2]
    scales: torch.Tensor | None = None  # float32 [N, nb]
    zero_points: torch.Tensor | None = None  # uint8 [N, ceil(nb/2)] or empty
    group_size: int = 0
    bits: int = 4
    input_scale: torch.Tensor | None = None  # QuantLinear's per-input-channel scale: x * input_scale first
    source: str = "float"  # "float" | "copied" (QuantLinear bytes) | "rtn" (quantized here)

    @property
    def q4(self) -> bool:
        """Packed MatMulNBits bytes (4-bit, or 8-bit from a QuantLinear8)."""
        return self.packed is not None

    def dequantized(self) -> torch.Tensor:
        from ..ops import dequantize_q4

        return dequantize_q4(self.packed, self.scales, self.zero_points, self.K)


@dataclass
class WeightPolicy:
    int4: bool = False
    group_size: int = 32
    symmetric: bool = True
    # module -> dequantized [N, K] weight that the exported graph computes with (for validation)
    substitutions: dict = field(default_factory=dict)
    counts: dict = field(default_factory=lambda: {"float": 0, "copied": 0, "rtn": 0})

    def proj(self, module, *, quantize: bool | None = None) -> Proj:
        """Describe ``module`` (Linear, Conv1D or QuantLinear) for export."""
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach().float()
        if is_quantized(module):
            bits = int(getattr(module, "bits", 4))
            scale = getattr(module, "input_scale", None)
            scale = None if scale is None else scale.detach().float()
            N, K = int(module.out_features), int(module.in_features)
            if bits == 4:
                p = Proj(N=N, K=K, bias=bias, packed=module.packed, scales=module.scales,
                         zero_points=module.zero_points, group_size=int(module.group_size), input_scale=scale,
                         source="copied")
            elif bits == 8:
                p = _q8_as_nbits(module.q, module.scales, N, K, bias, scale)
            else:
                raise InvalidSetting(f"cannot export a {bits}-bit quantized layer (4 and 8 bits are exportable)")
        else:
            w = weight_out_in(module).detach()
            p = Proj(N=w.shape[0], K=w.shape[1], bias=bias, weight=w.float())
            if self.int4 if quantize is None else quantize:
                p = self.rtn(p, module)
        self.counts[p.source] += 1
        return p

    def rtn(self, p: Proj, module=None) -> Proj:
        from ..ops import quantize_q4

        packed, scales, zp = quantize_q4(p.weight, self.group_size, self.symmetric)
        q = Proj(N=p.N, K=p.K, bias=p.bias, packed=packed, scales=scales, zero_points=zp,
                 group_size=self.group_size, source="rtn")
        if module is not None:
            self.substitutions[module] = q.dequantized()
        return q


def _q8_as_nbits(q, scales, N, K, bias, input_scale, block: int = 32) -> Proj:
    """int8 [N, K] + per-row scales -> MatMulNBits 8-bit bytes: codes q + 128 with zero point 128 (lossless)."""
    nb = -(-K // block)
    codes = torch.full((N, nb * block), 128, dtype=torch.uint8)
    codes[:, :K] = (q.to(torch.int16) + 128).to(torch.uint8)
    return Proj(N=N, K=K, bias=bias, packed=codes.view(N, nb, block), scales=scales.float()[:, None].expand(N, nb).contiguous(),
                zero_points=torch.full((N, nb), 128, dtype=torch.uint8), group_size=block, bits=8,
                input_scale=input_scale, source="copied")


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def concat(projs: list[Proj]) -> Proj | None:
    """Stack projections that read the same input into one (along N), or None if they cannot be."""
    first = projs[0]
    if any(p.K != first.K or p.q4 != first.q4 or p.bits != first.bits for p in projs):
        return None
    if any(not _same(p.input_scale, first.input_scale) for p in projs):
        return None
    if any((p.bias is None) != (first.bias is None) for p in projs):
        return None
    bias = None if first.bias is None else torch.cat([p.bias for p in projs])
    N = sum(p.N for p in projs)
    if not first.q4:
        return Proj(N=N, K=first.K, bias=bias, weight=torch.cat([p.weight for p in projs]), source=first.source,
                    input_scale=first.input_scale)
    if any(p.group_size != first.group_size or (p.zero_points.numel() == 0) != (first.zero_points.numel() == 0)
           for p in projs):
        return None
    zp = first.zero_points if first.zero_points.numel() == 0 else torch.cat([p.zero_points for p in projs])
    return Proj(N=N, K=first.K, bias=bias, packed=torch.cat([p.packed for p in projs]),
                scales=torch.cat([p.scales for p in projs]), zero_points=zp, group_size=first.group_size,
                bits=first.bits, input_scale=first.input_scale, source=first.source)


def initializers(g: Graph, p: Proj, name: str) -> list[str]:
    """The projection's weight initializers: [weight [K, N]] (float) or [qweight, scales(, qzeros)] (4-bit)."""
    if not p.q4:
        wt = np.ascontiguousarray(to_numpy(p.weight).T.astype(np.float32))  # [K, N] for MatMul
        return [g.initializer(f"{name}.weight", wt)]
    names = [g.initializer(f"{name}.qweight", to_numpy(p.packed)),
             g.initializer(f"{name}.scales", to_numpy(p.scales).reshape(-1))]
    if p.zero_points.numel():
        names.append(g.initializer(f"{name}.qzeros", to_numpy(p.zero_points).reshape(-1)))
    return names


def emit(g: Graph, x: str, p: Proj, name: str, accuracy_level: int, weights: list[str] | None = None) -> str:
    """Add ``x @ W^T (+ b)`` to the graph; returns the output name."""
    weights = weights or initializers(g, p, name)
    if p.input_scale is not None:
        x = g.node("Mul", [x, g.initializer(f"{name}.input_scale", to_numpy(p.input_scale))], f"{name}/InputScale")
    if p.q4:
        y = g.node("MatMulNBits", [x, *weights], f"{name}/MatMulNBits", domain=MS, K=p.K, N=p.N, bits=p.bits,
                   block_size=p.group_size, accuracy_level=accuracy_level)
    else:
        y = g.node("MatMul", [x, weights[0]], f"{name}/MatMul")
    if p.bias is not None:
        y = g.node("Add", [y, g.initializer(f"{name}.bias", to_numpy(p.bias).astype(np.float32))], f"{name}/Add")
    return y


def apply_substitutions(model, substitutions: dict):
    """Context manager: run ``model`` with each module's weight replaced by its dequantized copy."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        saved = []
        try:
            with torch.no_grad():
                for module, w in substitutions.items():
                    saved.append((module, module.weight))
                    new = w.t() if is_conv1d(module) else w
                    module.weight = torch.nn.Parameter(new.to(module.weight.dtype).contiguous(), requires_grad=False)
            yield model
        finally:
            for module, old in reversed(saved):
                module.weight = old

    return cm()
