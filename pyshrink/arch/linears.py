"""Uniform access to the two kinds of projection transformers use: ``nn.Linear`` (weight ``[out, in]``)
and GPT-2's ``Conv1D`` (weight ``[in, out]``). Stages slice and read weights through these helpers so no
stage needs to know which one a model uses.
"""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, matched by name so this module does not import transformers
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def is_projection(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m)


def weight_out_in(m: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view for Conv1D)."""
    return m.weight.t() if is_conv1d(m) else m.weight


def in_features(m: nn.Module) -> int:
    return m.weight.shape[0] if is_conv1d(m) else m.in_features


def out_features(m: nn.Module) -> int:
    return m.nf if is_conv1d(m) else m.out_features


def keep_outputs(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep only output features ``idx`` (rows of an ``[out, in]`` weight), in place, physically."""
    idx = idx.to(m.weight.device)
    with torch.no_grad():
        if is_conv1d(m):
            m.weight = nn.Parameter(m.weight[:, idx].contiguous())
            m.nf = len(idx)
        else:
            m.weight = nn.Parameter(m.weight[idx].contiguous())
            m.out_features = len(idx)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias[idx].contiguous())


def keep_inputs(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep only input features ``idx`` (columns of an ``[out, in]`` weight), in place, physically."""
    idx = idx.to(m.weight.device)
    with torch.no_grad():
        if is_conv1d(m):
            m.weight = nn.Parameter(m.weight[idx].contiguous())
        else:
            m.weight = nn.Parameter(m.weight[:, idx].contiguous())
            m.in_features = len(idx)


def resize(m: nn.Module, in_f: int, out_f: int) -> None:
    """Give ``m`` empty parameters of a new shape (used to build a skeleton that a smaller checkpoint fits)."""
    dev, dt = m.weight.device, m.weight.dtype
    if is_conv1d(m):
        m.weight = nn.Parameter(torch.empty(in_f, out_f, device=dev, dtype=dt))
        m.nf = out_f
    else:
        m.weight = nn.Parameter(torch.empty(out_f, in_f, device=dev, dtype=dt))
        m.in_features, m.out_features = in_f, out_f
    if m.bias is not None:
        m.bias = nn.Parameter(torch.empty(out_f, device=dev, dtype=dt))


def concat_outputs(mods) -> nn.Module:
    """One projection computing ``mods``' outputs side by side (``nn.Linear``s or pyshrink's quantized
    layers, all of one kind), so that q|k|v or gate|up of a block run as one call. The weights are copied;
    raises ``ValueError`` for projections that cannot share a call.
    """
    first = mods[0]
    if hasattr(first, "concat_outputs"):  # QuantLinear / QuantLinear8 (quantize imports arch: no import here)
        return type(first).concat_outputs(mods)
    if not all(type(m) is nn.Linear and m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
               and m.weight.dtype == first.weight.dtype for m in mods):
        raise ValueError(f"cannot concatenate {[type(m).__name__ for m in mods]}: need nn.Linear of one input "
                         "width, dtype and bias setting")
    out = nn.Linear(first.in_features, sum(m.out_features for m in mods), bias=first.bias is not None,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in mods]))
        if first.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in mods]))
    return out
