"""Tiny models of every family, a word-level tokenizer and text, so quantization tests run in seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny.py

from pyshrink.arch import ADAPTERS  # noqa: E402
from tiny import VOCAB, random_ids, tiny_model  # noqa: E402

# one entry per distinct adapter: a new family file is picked up here (and needs a tiny config in tiny.py)
FAMILY_NAMES = sorted({a.name for a in ADAPTERS.values()})


def word_tokenizer(n_words: int = VOCAB):
    """Words w0 .. w{n_words - 1}; more words than the tiny models' VOCAB makes another model's tokenizer."""
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_words)}
    tok = Tokenizer(tkm.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", pad_token="w1")


def word_text(n_words: int, seed: int = 0, vocab: int = VOCAB) -> str:
    """A random Markov-ish word sequence over the tiny vocabulary (or words w2 .. w{vocab - 1})."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n_words,), generator=g)
    return " ".join(f"w{i}" for i in ids.tolist())


def calib_ids(n: int = 2048, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g)


@torch.no_grad()
def model_output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


__all__ = ["FAMILY_NAMES", "tiny_model", "random_ids", "word_tokenizer", "word_text", "calib_ids", "model_output"]
