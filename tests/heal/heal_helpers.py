"""Helpers for the healing tests: a word-level tokenizer, Markov-chain text, and MLP contraction by weight norm.

(In a module of its own, not conftest.py: several test folders have a conftest, and ``from conftest import``
would pick whichever was imported first.)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny.py

from pyshrink.arch import adapter_for  # noqa: E402
from pyshrink.arch.linears import keep_inputs, keep_outputs, weight_out_in  # noqa: E402
from tiny import VOCAB  # noqa: E402

SEQ = 32


def word_tokenizer(prefix: str = "w"):
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"{prefix}{i}": i for i in range(VOCAB)}
    tok = Tokenizer(tkm.WordLevel(vocab, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=f"{prefix}0", eos_token=f"{prefix}1")


def markov_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(1234)  # the chain itself is fixed; ``seed`` picks the walk
    succ = torch.randint(2, VOCAB, (VOCAB, 3), generator=g)
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(seed)
    w, words = 2, []
    for _ in range(n_words):
        words.append(w)
        w = int(succ[w, torch.multinomial(probs, 1, generator=g)])
    return "\n".join(" ".join(f"w{i}" for i in words[j:j + 20]) for j in range(0, n_words, 20)) + "\n"


def mlp_widths(model) -> list[int]:
    """The MLP width of every block of ``model``."""
    ad = adapter_for(model)
    return [ad.mlp_width(b) for b in ad.blocks(model)]


def contract_mlp(model, keep: int, layers=None):
    """Physically keep the ``keep`` largest-norm MLP neurons of ``layers`` (all by default), in place."""
    ad = adapter_for(model)
    blocks = ad.blocks(model)
    for i in (range(len(blocks)) if layers is None else layers):
        b = blocks[i]
        ins, down = ad.mlp_in_modules(b), ad.mlp_out_module(b)
        score = sum(weight_out_in(m).norm(dim=1) for m in ins) + weight_out_in(down).norm(dim=0)
        idx = score.topk(keep).indices.sort().values
        for m in ins:
            keep_outputs(m, idx)
        keep_inputs(down, idx)
    if layers is None:
        model.config.intermediate_size = keep
    return model


def contract_cli(folder, *extra) -> int:
    """``pyshrink contract`` on the ``source_folder`` fixture's model and texts, writing ``folder/out``."""
    from pyshrink.cli import main

    return main(["contract", str(folder / "source"), "-o", str(folder / "out"), "--calibration",
                 str(folder / "train.txt"), "--eval", str(folder / "eval.txt"), "--calibration-tokens", "1024",
                 "--eval-tokens", "512", *extra])


def contract_cli_json(folder, capsys, *extra):
    """:func:`contract_cli` with ``--json``, which must succeed: its summary, and the model it saved."""
    from pyshrink import models

    assert contract_cli(folder, *extra, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    return summary, models.load_model(folder / "out", with_tokenizer=False)
