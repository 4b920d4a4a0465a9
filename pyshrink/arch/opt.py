"""OPT: fc1/fc2 MLP with ReLU, separate q/k/v/out projections with biases, LayerNorm."""
from . import register
from .base import Adapter

ADAPTER = register(Adapter(
    name="opt",
    model_types=("opt",),
    kind="decoder",
    layers="decoder.layers",
    mlp_in=("fc1",),
    mlp_out="fc2",
    attn="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
    embed="decoder.embed_tokens",
    final_norm="decoder.final_layer_norm",
    intermediate_attr="ffn_dim",
    head_attrs={"num_heads": "q_heads"},
    post_norm=("self_attn_layer_norm", "final_layer_norm"),  # OPT-350m: norms after the residual sums
    post_norm_applies=lambda block: not block.do_layer_norm_before,
    decode_with_mask=True,
))
