"""BERT encoders (all-MiniLM-L6-v2 and friends): post-LayerNorm blocks, GELU MLP, no causal mask."""
from . import register
from .base import Adapter

ADAPTER = register(Adapter(
    name="bert",
    model_types=("bert",),
    kind="encoder",
    layers="encoder.layer",
    mlp_in=("intermediate.dense",),
    mlp_out="output.dense",
    attn="attention",
    q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
    embed="embeddings.word_embeddings",
    head_attrs={"num_attention_heads": "q_heads", "all_head_size": "q_width"},
    head_module="attention.self",
    post_norm=("attention.output.LayerNorm", "output.LayerNorm"),
))
