"""Removing attention heads, grouped-query aware.

With ``n_q`` query heads sharing ``n_kv`` key/value heads (``groups = n_q / n_kv`` query heads per kv head),
two shapes stay valid for the attention code: removing the same number of query heads inside every kv
group (the kv heads stay), or removing whole kv groups (their kv head and all its query heads). Both are
scored on the input of the attention output projection (one channel per head dimension) with the same
OBS criterion and least-squares refit as MLP neurons (see :mod:`.scores`); the plan with the lower output
error per removed parameter wins. Multi-head attention is the case ``groups == 1``.

The result is recorded as the structure transform ``contract.heads`` (head counts per layer, kept head
indices, whether the output projection gained a bias).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.linears import out_features, weight_out_in
from ..models import record_transform, structure_handler
from . import scores
from .neurons import set_bias, set_weight_out_in

KIND = "contract.heads"


@dataclass
class HeadPlan:
    q_keep: torch.Tensor
    kv_keep: torch.Tensor
    weight: torch.Tensor  # new output projection [out, len(q_keep) * head_dim]
    bias: torch.Tensor | None
    error: float  # E||attention output change||^2 per token
    removed_params: int
    shape: str  # "heads-in-groups" | "kv-groups"


def _o_layer(adapter, block, stats, group: int) -> scores.Layer:
    o = adapter.attn_out_module(block)
    # on the CPU, where the statistics are (see calibration.BlockObserver.finish)
    w = weight_out_in(o).detach().to("cpu")  # its own dtype: read by bands (scores.Layer)
    b = o.bias.detach().to("cpu", torch.float64, copy=True) if o.bias is not None else None
    return scores.Layer(w, b, stats, group=group)


def _params_per_head(config, hd: int) -> tuple[int, int]:
    """Weights a query head owns (its q rows and o columns) and a kv head owns (its k and v rows)."""
    return 2 * config.hidden_size * hd, 2 * config.hidden_size * hd


def plan(adapter, block, config, stats, ratio: float, *, criterion: str = "obs", refit: str = "lstsq") -> HeadPlan | None:
    """The best way to remove ``ratio`` of the heads of ``block`` (None when no head can go)."""
    n_q, n_kv = adapter.head_counts(block, config)
    hd, groups = adapter.head_dim(config), n_q // n_kv
    per_q, per_kv = _params_per_head(config, hd)
    plans = []
    # (a) the same number of query heads inside every kv group
    r = min(groups - 1, round(ratio * groups))
    if r >= 1:
        layer = _o_layer(adapter, block, stats, hd)
        bucket = torch.arange(n_q) // groups
        if criterion == "obs":
            removed = scores.obs(layer, r * n_kv, bucket=bucket, per_bucket=r)
        else:  # rank inside each group
            removed = _ranked_per_bucket(layer, criterion, bucket, r)
        keep = scores.kept_groups(layer, removed)
        w, b, err = scores.refit_with_error(layer, keep, refit)
        plans.append(HeadPlan(keep, torch.arange(n_kv), w, b, err,
                              r * n_kv * per_q, "heads-in-groups"))
    # (b) whole kv groups (for multi-head attention, single heads)
    g = min(n_kv - 1, round(ratio * n_kv))
    if g >= 1:
        layer = _o_layer(adapter, block, stats, hd * groups)
        removed = scores.CRITERIA[criterion](layer, g)
        kv_keep = scores.kept_groups(layer, removed)
        w, b, err = scores.refit_with_error(layer, kv_keep, refit)
        q_keep = (kv_keep[:, None] * groups + torch.arange(groups)[None, :]).reshape(-1)
        plans.append(HeadPlan(q_keep, kv_keep, w, b, err,
                              g * (groups * per_q + per_kv), "kv-groups"))
    if not plans:
        return None
    best = min(plans, key=lambda p: p.error / p.removed_params)
    dt = adapter.attn_out_module(block).weight.dtype  # as neurons.plan: the dtype apply() would convert to
    best.weight = best.weight.to(dt)
    best.bias = None if best.bias is None else best.bias.to(dt)
    return best


def _ranked_per_bucket(layer, criterion, bucket, r):
    order = scores.CRITERIA[criterion](layer, layer.groups)  # all groups, least important first
    taken, out = {}, []
    for gidx in order.tolist():
        b = int(bucket[gidx])
        if taken.get(b, 0) < r:
            taken[b] = taken.get(b, 0) + 1
            out.append(gidx)
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def apply(model, adapter, index: int, p: HeadPlan) -> None:
    block = adapter.blocks(model)[index]
    config = model.config
    adapter.keep_heads(block, config, p.q_keep.sort().values, p.kv_keep.sort().values)
    o = adapter.attn_out_module(block)
    had_bias = o.bias is not None
    set_weight_out_in(o, p.weight)
    set_bias(o, p.bias)
    record_transform(model, KIND, layer=index, q_heads=len(p.q_keep), kv_heads=len(p.kv_keep),
                     kept_q=p.q_keep.sort().values.tolist(), kept_kv=p.kv_keep.sort().values.tolist(),
                     added_bias=bool(p.bias is not None and not had_bias))


@structure_handler(KIND)
def _rebuild(model, record) -> None:
    from ..arch import adapter_for

    adapter = adapter_for(model)
    block = adapter.blocks(model)[record["layer"]]
    adapter.resize_heads(block, model.config, record["q_heads"], record["kv_heads"])
    if record.get("added_bias"):
        o = adapter.attn_out_module(block)
        set_bias(o, torch.zeros(out_features(o)))
