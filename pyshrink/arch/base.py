"""What pyshrink needs to know about a model family, declared once per family in ``pyshrink/arch/<family>.py``.

An :class:`Adapter` is mostly data: dotted paths (relative to the model, or to one block) of the blocks,
the MLP projections and the attention projections. The generic code here turns them into modules, so a new
family is one small file that calls :func:`pyshrink.arch.register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Adapter:
    name: str
    model_types: tuple[str, ...]
    kind: str  # "decoder" (causal LM, perplexity) or "encoder" (BERT-like)
    layers: str  # path of the ModuleList of blocks, from ``model.base_model`` (so with or without a head)
    mlp_in: tuple[str, ...]  # projections whose OUTPUT features are the MLP neurons (gate/up, fc1, c_fc)
    mlp_out: str  # projection whose INPUT features are the MLP neurons (down, fc2, c_proj)
    attn: str  # path of the attention module inside a block
    q: str | None = None  # per-head projections inside a block (None for fused qkv)
    k: str | None = None
    v: str | None = None
    o: str | None = None
    qkv: str | None = None  # fused [q; k; v] projection (GPT-2 c_attn)
    embed: str = ""  # input token embedding, from ``model.base_model``
    final_norm: str | None = None  # from ``model.base_model``
    intermediate_attr: str = "intermediate_size"  # config attribute holding the MLP width
    extra: dict = field(default_factory=dict)

    # ---- modules ---------------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model.base_model, self.layers)

    def mlp_in_modules(self, block: nn.Module) -> list[nn.Module]:
        return [get_path(block, p) for p in self.mlp_in]

    def mlp_out_module(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.mlp_out)

    def attention(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.attn)

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return get_path(model.base_model, self.embed)

    def output_head(self, model: nn.Module):
        """The projection onto the vocabulary (None for a bare encoder)."""
        return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    # ---- shapes ----------------------------------------------------------------------------------------
    def num_heads(self, config) -> int:
        return config.num_attention_heads

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or self.num_heads(config)

    def head_dim(self, config) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // self.num_heads(config)

    def mlp_width(self, block: nn.Module) -> int:
        from .linears import in_features
        return in_features(self.mlp_out_module(block))

    def depth(self, model: nn.Module) -> int:
        return len(self.blocks(model))
