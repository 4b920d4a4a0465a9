"""Carry AdamW state across a contraction: slice it with the indices contraction kept.

A heal that goes on through a contraction (``iterative_contract(heal_schedule="continuous")``) keeps the
moments it has built up: the rows of the up/gate projections and the columns of the down projection of a
narrowed block keep exactly the entries of the neurons that stayed (the indices contraction reports as
``kept_neurons``). The down projection's weights were refitted by contraction, but its moments describe the
gradients of the same neurons, so they are still the best estimate there is. A tensor whose shape changed
for another reason (attention heads, or a contraction function that reports no kept indices) starts afresh,
and the counts say how many did.
"""
from __future__ import annotations

import torch

from ..arch import adapter_for
from ..arch.linears import is_conv1d


def _neuron_dims(model, kept_neurons: dict) -> dict:
    """``{parameter name: (dim, kept indices)}`` for the MLP projections of the narrowed blocks of ``model``."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    dims = {}
    for layer, keep in kept_neurons.items():
        block = blocks[layer]
        keep = torch.as_tensor(keep, dtype=torch.long)
        for m in adapter.mlp_in_modules(block):  # neurons are output features: rows ([in, out] for Conv1D)
            dims[names[id(m)] + ".weight"] = (1 if is_conv1d(m) else 0, keep)
            if m.bias is not None:
                dims[names[id(m)] + ".bias"] = (0, keep)
        down = adapter.mlp_out_module(block)  # ... and input features of the down projection
        dims[names[id(down)] + ".weight"] = (0 if is_conv1d(down) else 1, keep)
    return dims


def carry_optimizer_state(state: dict, model, kept_neurons: dict | None) -> tuple[dict, dict]:
    """The optimizer ``state`` (``{name: AdamW state}`` of the model before contraction) for the contracted
    ``model``; ``kept_neurons`` is ``{block: kept indices}`` of that contraction (None: none reported).

    Returns ``(state, counts)``; counts: ``carried`` (same shape, kept as is), ``sliced`` (narrowed with the kept
    indices), ``reset`` (shape changed without known indices, or the parameter is gone: starts afresh).
    """
    params = dict(model.named_parameters())
    dims = _neuron_dims(model, kept_neurons or {})
    out, counts = {}, {"carried": 0, "sliced": 0, "reset": 0}
    for name, st in state.items():
        p = params.get(name)
        old = st.get("exp_avg")
        if p is None or old is None:
            counts["reset"] += 1
            continue
        if name in dims:
            dim, keep = dims[name]
            new = {k: v.index_select(dim, keep.to(v.device)) if torch.is_tensor(v) and v.shape == old.shape else v
                   for k, v in st.items()}
            if new["exp_avg"].shape != p.shape:
                raise ValueError(f"slicing the optimizer state of {name} {tuple(old.shape)} with {len(keep)} kept "
                                 f"indices gives {tuple(new['exp_avg'].shape)}, not the parameter's {tuple(p.shape)}")
            out[name] = new
            counts["sliced"] += 1
        elif old.shape == p.shape:
            out[name] = st
            counts["carried"] += 1
        else:
            counts["reset"] += 1
    return out, counts
