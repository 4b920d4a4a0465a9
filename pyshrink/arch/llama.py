"""Llama family (Llama, SmolLM2, Mistral, Qwen2): gated MLP, grouped-query attention, RMSNorm, RoPE."""
from __future__ import annotations

import types

from . import register
from .base import Adapter
from .linears import concat_outputs


def _share(fused, mods) -> None:
    """Point each of ``mods``' weight tensors at its rows of ``fused``'s (one copy of the weights in memory)."""
    start = 0
    for m in mods:
        n = m.out_features
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is None or name == "input_scale" or t.dim() == 0 or t.shape[0] != n:
                continue  # input_scale is per input; an empty symmetric zero_points has no rows
            view = getattr(fused, name)[start:start + n]
            if name in m._parameters:
                m._parameters[name] = type(t)(view, requires_grad=t.requires_grad)
            else:
                m._buffers[name] = view
        start += n


def _fused_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                             cache=None, past_key_values=None, **kwargs):
    # transformers' LlamaAttention.forward (5.x) with q, k and v from one projection; the KV cache comes as
    # ``cache`` from newer transformers, as ``past_key_values`` from older ones (pyshrink.kv_cache)
    from transformers.models.llama import modeling_llama as ml

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.__dict__["_pyshrink_qkv"](hidden_states).split(self.__dict__["_pyshrink_qkv_split"], dim=-1)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
    cache = cache if cache is not None else past_key_values
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    attention = ml.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, ml.eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _fused_mlp_forward(self, x):
    gate, up = self.__dict__["_pyshrink_gate_up"](x).split(self.gate_proj.out_features, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def fuse(block) -> int:
    """q|k|v (Llama's attention class only) and gate|up of one block as one projection each (see
    :attr:`Adapter.fuse`); returns how many groups it fused (0 if already fused).

    The fused projections live outside the module tree (the state dict, ``pyshrink.save`` and the ONNX
    export see the separate projections as before) and the separate ones become views of their rows, so
    the weights stay in memory once. The forwards are instance attributes on the block's attention and MLP.
    """
    n = 0
    attn, mlp = block.self_attn, block.mlp
    # the attention forward below is Llama's; Qwen2's and Mistral's pass more arguments (sliding window)
    if type(attn).__name__ == "LlamaAttention" and "_pyshrink_qkv" not in attn.__dict__:
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        fused = concat_outputs(mods)
        _share(fused, mods)
        attn.__dict__["_pyshrink_qkv"] = fused  # not a registered submodule: no new state-dict keys
        attn.__dict__["_pyshrink_qkv_split"] = [m.out_features for m in mods]
        attn.forward = types.MethodType(_fused_attention_forward, attn)
        n += 1
    if "_pyshrink_gate_up" not in mlp.__dict__:
        mods = [mlp.gate_proj, mlp.up_proj]
        fused = concat_outputs(mods)
        _share(fused, mods)
        mlp.__dict__["_pyshrink_gate_up"] = fused
        mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
        n += 1
    return n


ADAPTER = register(Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    kind="decoder",
    layers="layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    embed="embed_tokens",
    final_norm="norm",
    head_attrs={"num_key_value_groups": "groups"},
    fuse=fuse,
))
