"""Tiny random models of every supported family, saved as ordinary transformers folders with a small BPE
tokenizer trained on CPython's built-in text (no network, no files outside the test's tmp folders).

The fixtures are re-exported by ``tests/arch/conftest.py`` and ``tests/contract/conftest.py``; test modules
import the helpers as ``from pyshrink_tiny_models import ...`` (a name no other test folder uses).
"""
from __future__ import annotations

import pytest
import torch

VOCAB = 384
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pyshrink.data import builtin_text

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([builtin_text("pydoc")[:200_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", mask_token="<mask>")


def tiny_config(family: str):
    import transformers as T

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama":
        return T.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                             tie_word_embeddings=True, architectures=["LlamaForCausalLM"], **ids)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                            architectures=["GPT2LMHeadModel"], **ids)
    if family == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, architectures=["OPTForCausalLM"], **ids)
    if family == "phi":
        return T.PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           partial_rotary_factor=0.5, architectures=["PhiForCausalLM"], **ids)
    if family == "bert":
        return T.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=256, architectures=["BertModel"],
                            pad_token_id=3)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    config = tiny_config(family)
    cls = getattr(T, config.architectures[0])
    model = cls(config).eval()
    with torch.no_grad():  # larger random weights than the init's 0.02, so every channel matters a bit
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.2)
    return model


def families() -> list[str]:
    """One family per distinct adapter in pyshrink.arch.ADAPTERS."""
    from pyshrink.arch import ADAPTERS

    return sorted({a.name for a in ADAPTERS.values()})


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    """``tiny_folder(family)`` -> path of a saved tiny random model of that family (made once per session)."""
    made = {}

    def make(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family).save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make
