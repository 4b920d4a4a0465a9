"""Llama family (Llama, SmolLM2, Mistral, Qwen2): gated MLP, grouped-query attention, RMSNorm, RoPE."""
from . import register
from .base import Adapter

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
))
