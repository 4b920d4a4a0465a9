"""Grouped-query attention for one-token decoding steps without copying the KV cache per query head.

transformers' ``sdpa`` attention repeats each key/value head for every query head of its group
(``repeat_kv``) before torch's SDPA whenever it runs under ``torch.compile`` with a mask, which a static
cache always has. For a one-token step over a static cache that copies the whole cache, at its full
capacity, twice per layer and per step: SmolLM2-135M (9 query heads on 3 key/value heads) spent most of a
compiled step in those copies once the capacity reached a few thousand positions (bench/RESULTS.md,
"Decode speed", ``bench/decoder_capacity.py``). Here a one-token query is regrouped instead, ``[b, heads,
1, d] -> [b, kv_heads, group, d]``, so that SDPA reads each key/value head once for the group's queries
(what transformers itself does outside ``torch.compile``, see ``pack_gqa``), and attention reads only the
cache positions the mask keeps (:func:`pyshrink.ops.attention.filled_attention`, on the CPU), not the static
cache's whole capacity. Every other call (prompts, models without grouped heads, training) goes to transformers'
``sdpa`` unchanged.

:func:`use_for_decoding` switches a model to it; :class:`pyshrink.runtime.torch_decoder.TorchDecoder` does so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import filled_attention

NAME = "pyshrink_gqa_sdpa"  # the attention implementation's name in transformers' registries


def gqa_step_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers attention-interface function: ``sdpa`` with one-token queries regrouped per key/value head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, d = query.shape
    plain = (q_len != 1 or groups == 1 or dropout != 0.0 or module.training or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None or kwargs.get("cache") is not None
             or (torch.is_grad_enabled() and query.requires_grad))  # the op has no backward
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q = query.reshape(b, heads // groups, groups, d)  # query head h = kv head h // groups, as repeat_kv orders them
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[1] == heads:  # a mask per query head: regroup it too
        mask = mask.reshape(b, heads // groups, groups, mask.shape[-1])
    # One query per row, so no causal flag: the mask says which cache positions are filled. Only the positions it
    # keeps are read, on the CPU (on a GPU, finding how many would cost a sync per layer: SDPA over all of them).
    if mask is not None and query.device.type == "cpu" and mask.shape[-1] == key.shape[-2]:
        out = filled_attention(q, key, value, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> bool:
    """Registers NAME with transformers' attention and mask interfaces; False where this transformers has none."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, gqa_step_attention)
    # without a mask function of its own, transformers builds no mask at all for an unknown implementation
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def use_for_decoding(model) -> bool:
    """Switches ``model`` (in place) from ``sdpa`` to :func:`gqa_step_attention` where it has grouped
    key/value heads; returns whether it uses it now (True also if it already did). Other models, models set
    to another attention implementation (``eager``, flash) and transformers without attention registries are
    left as they are.
    """
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:  # switched before (an earlier TorchDecoder)
        return True
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not heads or not kv_heads or kv_heads >= heads or current != "sdpa":
        return False
    if not hasattr(model, "set_attn_implementation") or not _register():
        return False
    model.set_attn_implementation(NAME)
    return True
