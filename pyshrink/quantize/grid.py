"""The quantization grids pyshrink stores, as pure-PyTorch fake quantization that quantizers search over.

The native ``quantize_q4`` / ``quantize_q8`` ops compute codes from the min/max of each group. Quantizers
that do better (clipping search, GPTQ) choose scales and codes themselves with :class:`Grid` and then pack
them with :func:`Grid.to_buffers` into exactly the layout those ops produce, so every path ends in the same
buffers and the same kernels. All math is float32 with round-half-to-even, as the kernels do.

* 4-bit symmetric: ``scale = r * m / -8`` (``m`` the signed element of largest magnitude in the group,
  ``r`` the clipping ratio), codes ``0..15`` around the implicit zero point 8.
* 4-bit asymmetric: ``lo = r * min(min w, 0)``, ``hi = r * max(max w, 0)``, ``scale = (hi - lo) / 15``,
  ``zp = clamp(round(-lo / scale), 0, 15)``, codes ``0..15``.
* 8-bit: one group per output row, ``scale = r * max|w| / 127``, codes ``-127..127``, zero point 0.

With ``r = 1`` these are bit-for-bit the rules of :mod:`pyshrink.ops.q4` and :mod:`pyshrink.ops.q8`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.q4 import pack_codes, pack_zero_points


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int  # for 8 bits: the whole row (K)
    symmetric: bool = True

    @classmethod
    def for_layer(cls, bits: int, group_size: int, symmetric: bool, K: int) -> "Grid":
        return cls(4, group_size, symmetric) if bits == 4 else cls(8, K, True)

    @property
    def qmin(self) -> float:
        return 0.0 if self.bits == 4 else -127.0

    @property
    def qmax(self) -> float:
        return 15.0 if self.bits == 4 else 127.0

    def blocks(self, K: int) -> int:
        return -(-K // self.group_size)

    # ---- shapes ------------------------------------------------------------------------------------------
    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """``[N, K]`` -> ``[N, nb, g]`` float32, zero-padded along K."""
        N, K = w.shape
        nb, g = self.blocks(K), self.group_size
        if nb * g == K:
            return w.float().reshape(N, nb, g)
        wp = torch.zeros(N, nb * g, dtype=torch.float32, device=w.device)
        wp[:, :K] = w
        return wp.view(N, nb, g)

    # ---- the rules ---------------------------------------------------------------------------------------
    def params(self, wg: torch.Tensor, ratio=1.0):
        """Scales and zero points ``[...]`` for groups ``wg [..., g]`` clipped by ``ratio`` (scalar or [...])."""
        if self.bits == 8:
            scale = wg.abs().amax(-1) * ratio / 127.0
            return scale, torch.zeros_like(scale)
        if self.symmetric:
            m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
            scale = m * ratio / -8.0
            return scale, torch.full_like(scale, 8.0)
        lo = wg.amin(-1).clamp(max=0.0) * ratio
        hi = wg.amax(-1).clamp(min=0.0) * ratio
        scale = (hi - lo) / 15.0
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.where(scale == 0, torch.zeros_like(scale), torch.clamp(torch.round(-lo / safe), 0, 15))
        return scale, zp

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """Integer-valued float codes of ``w`` on the grid (``scale``/``zp`` broadcast against ``w``)."""
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(w / safe) + zp, self.qmin, self.qmax)
        return torch.where(scale == 0, zp, q)

    @staticmethod
    def dequant(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        return (q - zp) * scale

    def fake(self, wg: torch.Tensor, ratio=1.0) -> torch.Tensor:
        """Quantize-dequantize groups ``wg [..., g]``."""
        scale, zp = self.params(wg, ratio)
        q = self.codes(wg, scale[..., None], zp[..., None])
        return self.dequant(q, scale[..., None], zp[..., None])

    def fake_weight(self, w: torch.Tensor, ratio=1.0) -> torch.Tensor:
        """Quantize-dequantize a whole ``[N, K]`` weight (``ratio`` scalar or ``[N, nb]``)."""
        N, K = w.shape
        return self.fake(self.grouped(w), ratio).reshape(N, -1)[:, :K]

    # ---- storage -----------------------------------------------------------------------------------------
    def to_buffers(self, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> dict:
        """Codes ``[N, nb, g]`` (float, integer-valued), scales/zero points ``[N, nb]`` -> the op's buffers."""
        if self.bits == 8:
            return {"q": q.reshape(q.shape[0], -1).to(torch.int8).contiguous(),
                    "scales": scale.reshape(-1).float().contiguous()}
        packed = pack_codes(q.to(torch.uint8))
        if self.symmetric:
            zps = torch.empty(0, dtype=torch.uint8, device=q.device)
        else:
            zps = pack_zero_points(zp.to(torch.uint8))
        return {"packed": packed, "scales": scale.float().contiguous(), "zero_points": zps}

    def quantize(self, w: torch.Tensor, ratio=1.0) -> dict:
        """Buffers for ``w [N, K]`` with clipping ``ratio`` (scalar or ``[N, nb]``)."""
        wg = self.grouped(w)
        scale, zp = self.params(wg, ratio)
        return self.to_buffers(self.codes(wg, scale[..., None], zp[..., None]), scale, zp)


def dequantize_buffers(buffers: dict, K: int) -> torch.Tensor:
    """float32 ``[N, K]`` weight that the buffers of a 4-bit or 8-bit layer stand for (pure PyTorch)."""
    if "q" in buffers:
        return buffers["q"].float() * buffers["scales"][:, None]
    from ..ops.q4 import dequantize_q4_reference

    return dequantize_q4_reference(buffers["packed"], buffers["scales"], buffers["zero_points"], K)
