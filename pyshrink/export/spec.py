"""What the graph builders need from a model, read from the live PyTorch modules (never from the config alone).

Widths and head counts come from each layer's own weights, so a contracted model (every layer its own MLP
width and head count) is described exactly. Family specifics that the architecture adapters do not carry
(norm kind, activation, positions, parallel blocks) are in :data:`FAMILY` below: one entry per family.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import adapter_for, get_path
from ..errors import InvalidSetting
from ..models import sliding_windows
from .weights import Proj, WeightPolicy, is_quantized


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


@dataclass
class Layer:
    norm_in: Norm
    norm_post: Norm | None  # None: parallel block (Phi) where attention and MLP share norm_in
    qkv: list  # [q, k, v] Projs, or [fused qkv] (GPT-2)
    o: Proj
    mlp_in: list  # [gate, up] (gated) or [fc1]
    mlp_out: Proj
    num_heads: int
    num_kv_heads: int
    scale: float
    window: int | None = None  # sliding-window attention (Mistral, Qwen2's sliding layers): keys within the last N


@dataclass
class DecoderSpec:
    family: str
    norm: str  # "rms" | "layer"
    act: str  # "silu" | "gelu_tanh" | "gelu" | "relu"
    gated: bool
    parallel: bool
    head_dim: int
    hidden: int
    vocab_size: int
    embed: torch.Tensor  # [V, H] float
    embed_module: object
    layers: list
    final_norm: Norm
    head: Proj
    head_module: object
    tied: bool
    rotary: tuple | None = None  # (cos [max, rot/2], sin [max, rot/2])
    positions: tuple | None = None  # (table [P, H], offset)
    max_positions: int = 2048
    extra: dict = field(default_factory=dict)


def _norm(m) -> Norm:
    eps = getattr(m, "variance_epsilon", None) or getattr(m, "eps", None)
    if eps is None:
        raise InvalidSetting(f"cannot read the epsilon of norm {type(m).__name__}")
    bias = getattr(m, "bias", None)
    return Norm(m.weight.detach().float(), None if bias is None else bias.detach().float(), float(eps))


def _act(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if name not in table:
        raise InvalidSetting(f"activation {name!r} is not exportable (supported: {', '.join(sorted(table))})")
    return table[name]


def _rotary(rotary_emb, max_len: int, rot_dim: int):
    """cos/sin caches [max_len, rot_dim/2] computed by the model's own rotary module (any RoPE scaling)."""
    dummy = torch.zeros(1, dtype=torch.float32)
    pos = torch.arange(max_len, dtype=torch.long)[None]
    with torch.no_grad():
        cos, sin = rotary_emb(dummy, pos)
    return cos[0, :, : rot_dim // 2].float().contiguous(), sin[0, :, : rot_dim // 2].float().contiguous()


# family -> how its blocks are put together (paths are relative to one block)
FAMILY = {
    "llama": dict(norm="rms", norm_in="input_layernorm", norm_post="post_attention_layernorm", gated=True,
                  parallel=False, act_attr="hidden_act", rotary=True),
    "gpt2": dict(norm="layer", norm_in="ln_1", norm_post="ln_2", gated=False, parallel=False,
                 act_attr="activation_function", positions=("wpe", 0)),
    "opt": dict(norm="layer", norm_in="self_attn_layer_norm", norm_post="final_layer_norm", gated=False,
                parallel=False, act_attr="activation_function", positions=("decoder.embed_positions", 2)),
    "phi": dict(norm="layer", norm_in="input_layernorm", norm_post=None, gated=False, parallel=True,
                act_attr="hidden_act", rotary=True),
}


def decoder_spec(model, policy: WeightPolicy, *, max_length: int | None = None) -> DecoderSpec:
    adapter = adapter_for(model)
    cfg = model.config
    fam = FAMILY.get(adapter.name)
    if fam is None or adapter.kind != "decoder":
        raise InvalidSetting(f"no decoder exporter for family {adapter.name!r}")
    base = model.base_model
    if adapter.name == "opt":
        if not getattr(cfg, "do_layer_norm_before", True) or base.decoder.project_in is not None:
            raise InvalidSetting("OPT models with post-LayerNorm blocks or word_embed_proj_dim != hidden_size "
                                 "(opt-350m) are not exportable")
    if adapter.name == "phi" and getattr(cfg, "qk_layernorm", False):
        raise InvalidSetting("Phi models with qk_layernorm are not exportable")
    head_dim = adapter.head_dim(cfg)
    if head_dim % 8:  # the decoder graph's attention is com.microsoft::GroupQueryAttention, which refuses others
        raise InvalidSetting(f"the attention heads have {head_dim} dimensions; ONNX Runtime's GroupQueryAttention, "
                             "which the exported decoder uses, needs a multiple of 8")
    max_pos = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))
    if max_length is not None and max_length > max_pos:
        raise InvalidSetting(f"max_length={max_length} is more than the model's {max_pos} positions; pass at most "
                             f"{max_pos}")
    max_len = min(max_pos, max_length or max_pos)

    windows = sliding_windows(cfg, adapter.depth(model))
    layers = []
    for i, block in enumerate(adapter.blocks(model)):
        if adapter.qkv:
            qkv_mod = get_path(block, adapter.qkv)
            qkv = [policy.proj(qkv_mod)]
            H = kvH = qkv[0].N // (3 * head_dim)
        else:
            mods = [get_path(block, p) for p in (adapter.q, adapter.k, adapter.v)]
            qkv = [policy.proj(m) for m in mods]
            H, kvH = qkv[0].N // head_dim, qkv[1].N // head_dim
        if H == 0 or kvH == 0 or H % kvH:
            raise InvalidSetting(f"layer {i}: {H} query heads over {kvH} key/value heads is not grouped-query attention")
        scale = float(getattr(adapter.attention(block), "scaling", head_dim ** -0.5))
        if adapter.name == "gpt2":
            scale = head_dim ** -0.5
            if not getattr(cfg, "scale_attn_weights", True):
                scale = 1.0
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(i + 1)
        post = get_path(block, fam["norm_post"]) if fam["norm_post"] else None
        layers.append(Layer(
            norm_in=_norm(get_path(block, fam["norm_in"])),
            norm_post=_norm(post) if post is not None else None,
            qkv=qkv, o=policy.proj(get_path(block, adapter.o)),
            mlp_in=[policy.proj(m) for m in adapter.mlp_in_modules(block)],
            mlp_out=policy.proj(adapter.mlp_out_module(block)),
            num_heads=H, num_kv_heads=kvH, scale=scale, window=windows[i],
        ))

    embed_mod = adapter.embedding(model)
    head_mod = adapter.output_head(model)
    tied = not is_quantized(head_mod) and head_mod.weight is embed_mod.weight
    head = policy.proj(head_mod)
    # int4 exports read the embedding in 4 bits too (GatherBlockQuantized): a tied head quantized here shares
    # its bytes; a float embedding next to an untied head (e.g. a head pyshrink.quantize calibrated) gets
    # bytes of its own. Rounding costs the embedding far less than the head (SmolLM2 contracted, WikiText-2,
    # development measurement in bench/RESULTS.md: head and embedding RTN 4-bit ppl 48.5, head alone 48.4,
    # neither 41.7), so a calibrated head is kept.
    embed_q = None
    if tied and head.source == "rtn":
        embed_q = head
        policy.substitutions[embed_mod] = policy.substitutions[head_mod]
    elif policy.int4 and not tied and not is_quantized(embed_mod):
        e = embed_mod.weight.detach().float()
        embed_q = policy.rtn(Proj(N=e.shape[0], K=e.shape[1], bias=None, weight=e), embed_mod)
    rotary = None
    if fam.get("rotary"):
        rot_dim = int(head_dim * _partial_rotary(cfg))
        rotary = _rotary(base.rotary_emb, max_len, rot_dim)
    positions = None
    if fam.get("positions"):
        path, offset = fam["positions"]
        table = get_path(base, path).weight.detach().float()
        positions = (table, offset)
        max_len = min(max_len, table.shape[0] - offset)
    extra = {"embedding_q4": embed_q}
    remap = getattr(embed_mod, "row_of_id", None)  # pyshrink.contract.vocab's CompactEmbedding
    if remap is not None:
        keep = getattr(head_mod, "kept_ids", None)
        if keep is None or len(keep) != head.N:
            raise InvalidSetting("a contracted vocabulary needs its CompactHead (kept_ids) next to the CompactEmbedding")
        extra.update(vocab_remap=remap.detach().long(), vocab_keep=keep.detach().long().tolist(),
                     full_vocab_size=int(embed_mod.num_embeddings))
    return DecoderSpec(
        family=adapter.name, norm=fam["norm"], act=_act(getattr(cfg, fam["act_attr"])), gated=fam["gated"],
        parallel=fam["parallel"], head_dim=head_dim, hidden=embed_mod.weight.shape[1],
        vocab_size=head.N, embed=embed_mod.weight.detach().float(), embed_module=embed_mod, layers=layers,
        final_norm=_norm(get_path(base, adapter.final_norm)), head=head, head_module=head_mod, tied=tied,
        rotary=rotary, positions=positions, max_positions=max_len, extra=extra,
    )


def _partial_rotary(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    return float(rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
