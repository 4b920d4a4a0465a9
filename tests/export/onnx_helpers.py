"""Tiny models for the export/runtime/benchmark tests: a word-level tokenizer, contracted and quantized variants."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny.py

from tiny import VOCAB, tiny_model  # noqa: E402

DECODERS = ("llama", "gpt2", "opt", "phi")


WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(2, VOCAB)]


def word_tokenizer():
    """``<eos> <unk> w2 .. w127`` as a fast tokenizer (whitespace-separated words; id 0 ends a sequence)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def text(ids) -> str:
    return " ".join(WORDS[i] for i in ids)


def contracted_llama(seed: int = 0):
    """Tiny Llama whose layers have different MLP widths, and a layer with half of its heads removed."""
    from pyshrink.arch.linears import keep_inputs, keep_outputs

    model = tiny_model("llama", seed)
    for i, (width, layer) in enumerate(zip((40, 96, 17), model.model.layers)):
        keep = torch.arange(width)
        keep_outputs(layer.mlp.gate_proj, keep)
        keep_outputs(layer.mlp.up_proj, keep)
        keep_inputs(layer.mlp.down_proj, keep)
    attn = model.model.layers[1].self_attn  # 4 q heads / 2 kv heads -> 2 / 1 (one whole group removed)
    D = attn.head_dim
    keep_outputs(attn.q_proj, torch.arange(2 * D))
    keep_outputs(attn.k_proj, torch.arange(D))
    keep_outputs(attn.v_proj, torch.arange(D))
    keep_inputs(attn.o_proj, torch.arange(2 * D))
    return model


def vocab_contracted(model, keep):
    """Keep only token ids ``keep`` with pyshrink's vocabulary contraction (the model still reads original ids)."""
    from pyshrink.contract.vocab import apply

    apply(model, torch.as_tensor(keep))
    return model


def quantized(model, group_size: int = 32, symmetric: bool = True, bits: int = 4):
    """Replace every block projection by a pyshrink QuantLinear (4-bit) or QuantLinear8 (round-to-nearest)."""
    from pyshrink.arch import adapter_for
    from pyshrink.quantize.linear import QuantLinear, QuantLinear8

    adapter = adapter_for(model)
    paths = (adapter.qkv,) if adapter.qkv else (adapter.q, adapter.k, adapter.v)
    for block in adapter.blocks(model):
        for path in (*paths, adapter.o, *adapter.mlp_in, adapter.mlp_out):
            parent, _, leaf = path.rpartition(".")
            owner = block.get_submodule(parent) if parent else block
            layer = getattr(owner, leaf)
            new = (QuantLinear.from_float(layer, group_size=group_size, symmetric=symmetric, fast=False) if bits == 4
                   else QuantLinear8.from_float(layer))
            setattr(owner, leaf, new)
    return model


@torch.no_grad()
def outlier_llama(seed: int = 0, channel: int = 5, outlier: float = 1e4):
    """Tiny Llama where int8 activations break exactly one projection: in layer 1 the MLP's input has one
    channel 10^4 times the others (its norm weight) that the gate/up weights ignore (zero columns), so the
    function is unchanged, but int8 per-block quantization of that input rounds the rest of the channel's
    block to 0. The MLP output and the final norm are scaled up so that this shows in the logits."""
    model = tiny_model("llama", seed)
    layer = model.model.layers[1]
    layer.post_attention_layernorm.weight[channel] = outlier
    layer.mlp.gate_proj.weight[:, channel] = 0
    layer.mlp.up_proj.weight[:, channel] = 0
    layer.mlp.down_proj.weight.mul_(30)
    model.model.norm.weight.mul_(10)
    return model


@torch.no_grad()
def torch_greedy(model, ids, n: int) -> list[int]:
    """Greedy generation with full-sequence PyTorch forwards (no cache, no end-of-sequence stop)."""
    seq = torch.tensor([list(ids)])
    out = []
    for _ in range(n):
        tok = int(model(seq).logits[0, -1].argmax())
        out.append(tok)
        seq = torch.cat([seq, torch.tensor([[tok]])], 1)
    return out


def random_prompt(n: int, seed: int = 0, lo: int = 2) -> list[int]:
    return np.random.default_rng(seed).integers(lo, VOCAB, size=n).tolist()
