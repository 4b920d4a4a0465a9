"""Tiny randomly initialised models of every supported family, for tests (no downloads, < 1 s each)."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128


def _configs():
    common = dict(vocab_size=VOCAB, num_hidden_layers=3, num_attention_heads=4)
    return {
        "llama": (tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_key_value_heads=2,
                                 max_position_embeddings=256, tie_word_embeddings=True, **common),
                  tf.LlamaForCausalLM),
        "gpt2": (tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_inner=96, vocab_size=VOCAB, n_positions=256,
                               bos_token_id=0, eos_token_id=0), tf.GPT2LMHeadModel),
        "opt": (tf.OPTConfig(hidden_size=64, ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=256,
                             bos_token_id=0, eos_token_id=0, pad_token_id=1, **common), tf.OPTForCausalLM),
        "phi": (tf.PhiConfig(hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                             bos_token_id=0, eos_token_id=0, **common), tf.PhiForCausalLM),
        "bert": (tf.BertConfig(hidden_size=64, intermediate_size=96, max_position_embeddings=256, **common),
                 tf.BertModel),
    }


FAMILIES = tuple(_configs())


def tiny_model(family: str, seed: int = 0):
    config, cls = _configs()[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    # random init leaves LayerNorm/RMSNorm at identity and biases at zero: perturb them so tests that
    # depend on every parameter (compensation, export parity) see realistic, non-trivial values
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)
