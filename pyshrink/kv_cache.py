"""How a KV cache goes into a transformers causal LM and comes back out, in the transformers versions pyshrink
runs on.

transformers renamed the forward's ``past_key_values`` argument (and the output's field) to ``cache`` and dropped
``cache_position``: the cache counts the tokens it holds, and the positions come in as ``position_ids``. The old
names still work there for a while with a deprecation warning, but a layer whose forward pyshrink replaces (the
fused attention) must take the cache under the name the model passes it, and the positions must go where the
model reads them, so every call site asks here.
"""
from __future__ import annotations

import inspect

import torch


def takes_cache(model) -> bool:
    """True where ``model``'s forward takes its KV cache as ``cache`` (newer transformers), False where it takes
    ``past_key_values`` with ``cache_position``."""
    return "cache" in inspect.signature(type(model).forward).parameters


def cache_inputs(model, cache, positions: torch.Tensor | None = None) -> dict:
    """Keyword arguments that hand ``cache`` to ``model``'s forward, with the 1-D ``positions`` of the new
    tokens where the caller knows them (a static cache needs them under the older API)."""
    if takes_cache(model):
        return {"cache": cache} if positions is None else {"cache": cache, "position_ids": positions[None]}
    return {"past_key_values": cache} if positions is None else {"past_key_values": cache, "cache_position": positions}


def returned_cache(output):
    """The KV cache in a model's output, under either name."""
    cache = getattr(output, "cache", None) if "cache" in getattr(output, "__dataclass_fields__", {}) else None
    return cache if cache is not None else output.past_key_values


__all__ = ["takes_cache", "cache_inputs", "returned_cache"]
