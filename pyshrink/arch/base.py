"""What pyshrink needs to know about a model family, declared once per family in ``pyshrink/arch/<family>.py``.

An :class:`Adapter` is mostly data: dotted paths (relative to the model, or to one block) of the blocks,
the MLP projections and the attention projections. The generic code here turns them into modules, so a new
family is one small file that calls :func:`pyshrink.arch.register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def module_name(root: nn.Module, module: nn.Module) -> str | None:
    """The qualified name of ``module`` inside ``root`` (None if it is not there): the inverse of get_path."""
    for name, m in root.named_modules():
        if m is module:
            return name
    return None


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
    # Attention attributes that follow the head count, set after heads are removed: the module at
    # ``head_module`` (a path inside a block; default ``attn``) gets ``attr = value`` for each entry, where
    # value names one of: "q_heads", "kv_heads", "groups" (query heads per kv head), "q_width" (q_heads*head_dim).
    head_attrs: dict = field(default_factory=dict)
    head_module: str | None = None
    # Post-LayerNorm blocks (BERT; OPT with do_layer_norm_before=False): the LayerNorms (paths inside a block) that
    # the attention's and the MLP's residual sums pass through, in that order. Contraction reports each
    # sub-block's relative error at its norm's INPUT, where the projection's change lands; the block output
    # is after the norm, on another scale (pyshrink.contract.layer_selection says why blocks are still ranked
    # against it). ``post_norm_applies`` (block -> bool) says whether a block of a family that can be either is
    # post-norm.
    post_norm: tuple[str, str] | None = None
    post_norm_applies: Callable | None = None
    # Decoding over a static cache (pyshrink.runtime.torch_decoder) passes the positions and a mask of the cache's
    # length: without them transformers' OPT derives positions from how much of the cache is filled, a
    # data-dependent shape torch.compile cannot trace ("Could not guard on data-dependent expression").
    decode_with_mask: bool = False
    # ``fuse(block)`` (optional): make the block run its q|k|v and its gate|up projections as one call each
    # (fewer operator calls per decode step; see pyshrink.runtime.torch_decoder). Returns how many groups it
    # fused. Families without one cannot be fused.
    fuse: Callable | None = None

    # ---- modules ---------------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model.base_model, self.layers)

    def mlp_in_modules(self, block: nn.Module) -> list[nn.Module]:
        return [get_path(block, p) for p in self.mlp_in]

    def mlp_out_module(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.mlp_out)

    def attention(self, block: nn.Module) -> nn.Module:
        return get_path(block, self.attn)

    def attn_out_module(self, block: nn.Module) -> nn.Module:
        """The attention output projection (its input features are heads x head_dim)."""
        return get_path(block, self.o)

    def post_norm_modules(self, block: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """(attention's, MLP's) post-LayerNorm of a post-norm block; None for a pre-norm one."""
        if self.post_norm is None or (self.post_norm_applies is not None and not self.post_norm_applies(block)):
            return None
        return get_path(block, self.post_norm[0]), get_path(block, self.post_norm[1])

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

    # ---- attention heads -------------------------------------------------------------------------------
    def head_counts(self, block: nn.Module, config) -> tuple[int, int]:
        """``(query heads, key/value heads)`` of one block as it is now (blocks may differ after pruning)."""
        from .linears import out_features
        hd = self.head_dim(config)
        if self.qkv:  # fused q|k|v of equal widths (multi-head attention)
            n = out_features(get_path(block, self.qkv)) // (3 * hd)
            return n, n
        return out_features(get_path(block, self.q)) // hd, out_features(get_path(block, self.k)) // hd

    def _head_rows(self, heads, hd):
        import torch
        heads = torch.as_tensor(heads, dtype=torch.long)
        return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)

    def keep_heads(self, block: nn.Module, config, q_keep, kv_keep) -> None:
        """Keep query heads ``q_keep`` and key/value heads ``kv_keep`` (sorted indices), physically.

        Query heads must stay grouped: kept query heads of kv head ``j`` are contiguous and every kept kv
        head keeps the same number of them (the attention code maps query head ``h`` to kv head
        ``h // groups``).
        """
        import torch
        from .linears import keep_inputs, keep_outputs
        hd = self.head_dim(config)
        q_rows, kv_rows = self._head_rows(q_keep, hd), self._head_rows(kv_keep, hd)
        if self.qkv:
            n_q, _ = self.head_counts(block, config)
            w = n_q * hd
            keep_outputs(get_path(block, self.qkv), torch.cat([q_rows, w + kv_rows, 2 * w + kv_rows]))
        else:
            keep_outputs(get_path(block, self.q), q_rows)
            keep_outputs(get_path(block, self.k), kv_rows)
            keep_outputs(get_path(block, self.v), kv_rows)
        keep_inputs(get_path(block, self.o), q_rows)
        self.set_head_attrs(block, config, len(q_keep), len(kv_keep))

    def resize_heads(self, block: nn.Module, config, n_q: int, n_kv: int) -> None:
        """Give a skeleton block empty projections for ``n_q`` query and ``n_kv`` key/value heads."""
        from .linears import in_features, out_features, resize
        hd = self.head_dim(config)
        if self.qkv:
            m = get_path(block, self.qkv)
            resize(m, in_features(m), (n_q + 2 * n_kv) * hd)
        else:
            for path, n in ((self.q, n_q), (self.k, n_kv), (self.v, n_kv)):
                m = get_path(block, path)
                resize(m, in_features(m), n * hd)
        o = get_path(block, self.o)
        resize(o, n_q * hd, out_features(o))
        self.set_head_attrs(block, config, n_q, n_kv)

    def set_head_attrs(self, block: nn.Module, config, n_q: int, n_kv: int) -> None:
        values = {"q_heads": n_q, "kv_heads": n_kv, "groups": n_q // max(n_kv, 1),
                  "q_width": n_q * self.head_dim(config)}
        mod = get_path(block, self.head_module or self.attn)
        for attr, what in self.head_attrs.items():
            setattr(mod, attr, values[what])
