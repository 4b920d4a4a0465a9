"""Fixtures for the healing tests: a tiny trained teacher, its contracted student, a word-level tokenizer.

The text is a random Markov chain over the words ``w2..w127`` (three likely successors per word), so a
teacher trained on it for a few hundred steps has a held-out perplexity far below the vocabulary size, and a
student with half of its MLP neurons removed has a clearly worse one: there is something to heal.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/tiny.py

from heal_helpers import SEQ, contract_mlp, markov_text, word_tokenizer  # noqa: E402
from tiny import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def texts():
    return {"train": markov_text(6000, seed=1), "eval": markov_text(1200, seed=2)}


@pytest.fixture(scope="session")
def trained_teacher(tokenizer, texts):
    from pyshrink import data

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = data.windows(data.tokenize(tokenizer, texts["train"]), SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        batch = ids[torch.randint(len(ids), (8,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(old)
    return model.eval()


@pytest.fixture()
def teacher(trained_teacher):
    return copy.deepcopy(trained_teacher)


@pytest.fixture()
def student(trained_teacher):
    return contract_mlp(copy.deepcopy(trained_teacher), keep=24)


@pytest.fixture()
def source_folder(trained_teacher, tokenizer, texts, tmp_path):
    """The trained teacher saved as a model folder, with its training and evaluation texts beside it."""
    from pyshrink import models

    models.save(trained_teacher, tokenizer, tmp_path / "source")
    (tmp_path / "train.txt").write_text(texts["train"])
    (tmp_path / "eval.txt").write_text(texts["eval"])
    return tmp_path
