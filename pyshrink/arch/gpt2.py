"""GPT-2: Conv1D projections (weight [in, out]), fused q|k|v in c_attn, LayerNorm, learned positions."""
from . import register
from .base import Adapter

ADAPTER = register(Adapter(
    name="gpt2",
    model_types=("gpt2",),
    kind="decoder",
    layers="h",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    attn="attn",
    qkv="attn.c_attn", o="attn.c_proj",
    embed="wte",
    final_norm="ln_f",
    intermediate_attr="n_inner",
    head_attrs={"num_heads": "q_heads", "split_size": "q_width"},
))
