"""Data-free calibration: reproducible text sampled from the model itself; encoders use built-in text."""
import torch

import pyshrink
from pyshrink.contract import datafree

from pyshrink_tiny_models import tiny_model


def test_sampling_is_seeded_and_avoids_special_tokens(tokenizer):
    model = tiny_model("llama")
    a = datafree.sample_ids(model, tokenizer, tokens=40, seq_len=10, batch=3, seed=7, progress=False)
    b = datafree.sample_ids(model, tokenizer, tokens=40, seq_len=10, batch=3, seed=7, progress=False)
    c = datafree.sample_ids(model, tokenizer, tokens=40, seq_len=10, batch=3, seed=8, progress=False)
    assert a.shape == (4, 10)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not set(a.flatten().tolist()) & set(tokenizer.all_special_ids)


def test_datafree_contract_says_which_text_it_used(tiny_folder):
    res = pyshrink.contract(tiny_folder("llama"), 0.5, 1, seq_len=64, datafree_tokens=256, eval_tokens=256,
                            progress=False)
    s = res.summary
    assert s["mode"] == "data-free"
    assert "sampled from the source model" in s["calibration"]["text"]
    assert "pydoc" in s["evaluation"]["text"]
    assert s["params_after"] < s["params_before"] and s["ppl_final"] > 0


def test_calibration_tokens_caps_the_sampled_text_too(tiny_folder):
    kw = dict(seq_len=64, eval_tokens=256, progress=False)
    capped = pyshrink.contract(tiny_folder("llama"), 0.5, 1, datafree_tokens=512, calibration_tokens=128, **kw)
    full = pyshrink.contract(tiny_folder("llama"), 0.5, 1, datafree_tokens=512, **kw)
    assert capped.summary["calibration"]["tokens"] == 128 and full.summary["calibration"]["tokens"] == 512


def test_encoder_datafree_uses_builtin_text_and_reports_cosine(tiny_folder):
    res = pyshrink.contract(tiny_folder("bert"), 0.3, 1, seq_len=64, datafree_tokens=256, eval_tokens=256,
                            progress=False)
    s = res.summary
    assert "built-in" in s["calibration"]["text"]
    assert s["evaluation"]["metric"] == "embedding_cosine" and 0.5 < s["embedding_cosine"] <= 1.0
