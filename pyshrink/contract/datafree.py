"""Calibration without user data.

Decoders calibrate on text they write themselves: a fixed-seed batch of sequences, each started from one
random ordinary token and continued by sampling at temperature 1 with the KV cache. The activations that
text produces follow the model's own distribution, which is what the statistics need; no corpus is
required and the result is reproducible (seeded generator, global RNG untouched). Encoders cannot write,
so they calibrate on CPython's built-in documentation text (:func:`pyshrink.data.builtin_text`).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import data
from ..errors import InvalidSetting
from ..kv_cache import cache_inputs, returned_cache
from .vocab import protected_ids


def sample_ids(model, tokenizer, *, tokens: int = 4096, seq_len: int = 128, batch: int = 64,
               temperature: float = 1.0, seed: int = 0, progress: bool = True) -> torch.Tensor:
    """``[n, seq_len]`` token ids sampled from ``model`` itself: ``tokens // seq_len`` sequences (``tokens`` is
    a budget, "at most"; less than one sequence is an error).

    Decoding runs on one CPU thread: each step is a handful of tiny matmuls, where a second thread saves
    little and, on a busy machine, its synchronization barriers can stall every op for a scheduler quantum
    (measured here: 11.5 s vs 1.3 s per step for SmolLM2 under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sample(model, tokenizer, tokens, seq_len, batch, temperature, seed, progress)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _sample(model, tokenizer, tokens, seq_len, batch, temperature, seed, progress) -> torch.Tensor:
    config = model.config
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    banned = sorted(i for i in protected_ids(tokenizer, config) if i < config.vocab_size)
    n_seq = tokens // seq_len
    if n_seq < 1:
        raise InvalidSetting(f"at most {tokens} data-free calibration tokens were asked for, less than one sampled "
                             f"sequence of {seq_len}: ask for at least {seq_len}")
    out = []
    bar = tqdm(total=n_seq * seq_len, desc="data-free calibration text", unit="tok", disable=not progress, leave=False)
    for start in range(0, n_seq, batch):
        b = min(batch, n_seq - start)
        first = torch.randint(0, config.vocab_size, (b, 1), generator=gen)
        for i in range(b):  # start from an ordinary token, not a special one
            while int(first[i, 0]) in banned:
                first[i, 0] = int(torch.randint(0, config.vocab_size, (1,), generator=gen))
        seq = [first]
        res = model(input_ids=first.to(device), use_cache=True)
        past = returned_cache(res)
        for _ in range(seq_len - 1):
            logits = res.logits[:, -1].float() / temperature
            if banned:  # keep the text flowing: no end-of-text, padding or other special tokens
                logits[:, banned] = float("-inf")
            nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen)
            seq.append(nxt)
            res = model(input_ids=nxt.to(device), use_cache=True, **cache_inputs(model, past))
            past = returned_cache(res)
            bar.update(b)
        bar.update(b)
        out.append(torch.cat(seq, 1))
    bar.close()
    return torch.cat(out)


def encoder_ids(tokenizer, *, tokens: int = 4096, seq_len: int = 128, vocab: int | None = None) -> torch.Tensor:
    """Built-in English text in ``[n, seq_len]`` windows, for encoders (``vocab``: as :func:`pyshrink.data.windows`)."""
    ids = data.tokenize(tokenizer, data.builtin_text("pydoc"))
    return data.windows(ids, seq_len, tokens, what="built-in calibration text", vocab=vocab)
