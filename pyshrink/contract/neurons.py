"""Physically removing MLP neurons: rows of the up/gate (fc1, c_fc) projections, columns of the down
projection (fc2, c_proj), whose kept columns and bias may be re-solved (see :mod:`.scores`).

The new per-layer width, and whether the down projection gained a bias, is recorded as the structure
transform ``contract.mlp`` so :func:`pyshrink.load_model` rebuilds the heterogeneous widths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch.linears import in_features, is_conv1d, keep_outputs, out_features, resize, weight_out_in
from ..models import record_transform, structure_handler
from . import scores
from .scores import Layer

KIND = "contract.mlp"


def down_layer(adapter, block, stats) -> Layer:
    """The down projection of ``block`` as a :class:`Layer` with its input statistics."""
    down = adapter.mlp_out_module(block)
    # on the CPU, where the statistics are (see calibration.BlockObserver.finish)
    w = weight_out_in(down).detach().to("cpu")  # its own dtype: read by bands (scores.Layer)
    b = down.bias.detach().to("cpu", torch.float64, copy=True) if down.bias is not None else None
    # the norms only (float64 copies of the gate and up projections were two more down-projection-sized tensors)
    ins = [torch.linalg.vector_norm(weight_out_in(m).detach(), dim=1, dtype=torch.float64).cpu()
           for m in adapter.mlp_in_modules(block)]
    extra = torch.stack(ins).prod(0) if ins else None
    return Layer(w, b, stats, group=1, extra_norms=extra)


def set_weight_out_in(m: nn.Module, w: torch.Tensor) -> None:
    """Give projection ``m`` the weight ``w [out, in]`` (transposed for Conv1D), in ``m``'s dtype."""
    dt, dev = m.weight.dtype, m.weight.device
    w = w.to(device=dev, dtype=dt)
    m.weight = nn.Parameter((w.T if is_conv1d(m) else w).contiguous())
    if not is_conv1d(m):
        m.in_features, m.out_features = w.shape[1], w.shape[0]


def set_bias(m: nn.Module, b: torch.Tensor | None) -> None:
    if b is not None:
        m.bias = nn.Parameter(b.to(device=m.weight.device, dtype=m.weight.dtype).contiguous())


@torch.no_grad()
def apply(model, adapter, index: int, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Keep neurons ``keep`` of block ``index``; the down projection becomes ``weight [out, K]`` (+ ``bias``)."""
    block = adapter.blocks(model)[index]
    keep = keep.sort().values
    for m in adapter.mlp_in_modules(block):
        keep_outputs(m, keep)
    down = adapter.mlp_out_module(block)
    had_bias = down.bias is not None
    set_weight_out_in(down, weight)
    set_bias(down, bias)
    record_transform(model, KIND, layer=index, width=len(keep),
                     added_bias=bool(bias is not None and not had_bias))


@structure_handler(KIND)
def _rebuild(model, record) -> None:
    from ..arch import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[record["layer"]]
    width = record["width"]
    for m in adapter.mlp_in_modules(block):
        resize(m, in_features(m), width)
    down = adapter.mlp_out_module(block)
    resize(down, width, out_features(down))
    if record.get("added_bias"):
        set_bias(down, torch.zeros(out_features(down)))


@dataclass
class NeuronPlan:
    keep: torch.Tensor  # kept neuron indices (sorted)
    weight: torch.Tensor  # new down projection [out, len(keep)]
    bias: torch.Tensor | None
    error: float  # E||MLP output change||^2 per calibration token
    width_before: int


def plan(adapter, block, stats, *, n_remove: int | None = None, remove: torch.Tensor | None = None,
         criterion: str = "obs", refit: str = "lstsq") -> NeuronPlan:
    """How to remove ``n_remove`` neurons (chosen by ``criterion``) or exactly the neurons ``remove``."""
    layer = down_layer(adapter, block, stats)
    if remove is None:
        remove = scores.CRITERIA[criterion](layer, n_remove)
    keep = scores.kept_groups(layer, remove)
    w, b, err = scores.refit_with_error(layer, keep, refit)
    # kept in the projection's dtype (apply() converts to it anyway, so the values are the same): a plan is made
    # for every candidate block and kept until the choice, and float64 copies of every block's down projection
    # would take 2x a float32 model's and 4x a bf16 model's
    dt = adapter.mlp_out_module(block).weight.dtype
    return NeuronPlan(keep, w.to(dt), None if b is None else b.to(dt), err, layer.groups)
