"""Phi (Phi-1/1.5/2): parallel attention and MLP off one LayerNorm, fc1/fc2 MLP, partial rotary."""
from . import register
from .base import Adapter

ADAPTER = register(Adapter(
    name="phi",
    model_types=("phi",),
    kind="decoder",
    layers="layers",
    mlp_in=("mlp.fc1",),
    mlp_out="mlp.fc2",
    attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.dense",
    embed="embed_tokens",
    final_norm="final_layernorm",
    head_attrs={"num_key_value_groups": "groups"},
))
