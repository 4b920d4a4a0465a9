"""Whole models of every family: quantize, run, save, reload, generate."""
import json

import pytest
import torch

from _quantutil import FAMILY_NAMES, calib_ids, model_output, random_ids, tiny_model, word_tokenizer
from pyshrink import models
from pyshrink.arch import adapter_for
from pyshrink.arch.linears import is_projection
from pyshrink.ops import memory
from pyshrink.quantize import QuantLinear, QuantLinear8, quantize, quantize_model
from pyshrink.quantize.config import QuantConfig

SMALL = dict(seq_len=64, min_calib_tokens=256, progress=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_quantizes_and_runs(family):
    ids = random_ids()
    ref_model = tiny_model(family)
    ref = model_output(ref_model, ids)

    rtn = quantize_model(tiny_model(family), QuantConfig(method="rtn", group_size=32, **SMALL), calibration=calib_ids())
    model = tiny_model(family)
    rep = quantize_model(model, QuantConfig(method="auto", group_size=32, **SMALL), calibration=calib_ids())
    blocks = adapter_for(model).blocks(model)
    for block in blocks:  # every projection inside the blocks is quantized, nothing is left as a float Linear
        assert not any(is_projection(m) for m in block.modules())
        assert any(isinstance(m, QuantLinear) for m in block.modules())
    head = adapter_for(model).output_head(model)
    assert head is None or isinstance(head, torch.nn.Linear)  # skipped by default
    assert rep.method == "auto" and len(rep.layers) == len(rtn.layers) > 0
    out = model_output(model, ids)
    assert torch.isfinite(out).all() and _rel(out, ref) < 0.25
    mean = lambda r: sum(l.rel_error for l in r.layers) / len(r.layers)  # noqa: E731
    assert mean(rep) < mean(rtn)  # calibration output error, layer by layer
    assert all(l.error_kind == "output" for l in rep.layers)
    assert 4.4 < rep.bits_per_weight < 5.2  # 4-bit codes + a float32 scale per 32


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_data_free_rtn(family):
    model = tiny_model(family)
    ref = model_output(tiny_model(family), random_ids())
    rep = quantize_model(model, QuantConfig(method="auto", group_size=64, progress=False))  # no data: rtn
    assert rep.method == "rtn" and rep.calib_tokens == 0
    assert all(l.error_kind == "weight" and l.method == "rtn" for l in rep.layers)
    assert _rel(model_output(model, random_ids()), ref) < 0.3


def test_eight_bit_is_nearly_lossless():
    ids = random_ids()
    ref = model_output(tiny_model("llama"), ids)
    model = quantize(tiny_model("llama"), bits=8, calibration=calib_ids(), **SMALL)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear8)
    assert _rel(model_output(model, ids), ref) < 0.02


def _massive_llama():
    """The tiny Llama with a "massive activation": token 0's embedding holds 1e4 in one channel, so every
    block's residual stream carries it on the first token (SmolLM2-135M reaches 2e4 that way)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 5] = 1e4
    return model


def _bos_windows(n, seed):
    ids = calib_ids(n, seed).view(-1, 64).clone()
    ids[:, 0] = 0
    return ids


def test_eight_bit_auto_is_no_worse_than_rtn_with_a_massive_activation():
    # The regression behind SmolLM2's auto:8 = 1.057 x fp32 perplexity (RTN-8: 1.001): an inexact AWQ fold
    # passed the fold check, so the model changed outside every layer's measured error. Measured here
    # before the fix: output error 0.107 (auto) vs 0.008 (rtn), while every layer's error was below rtn's.
    calib, ids = _bos_windows(2048, 1), _bos_windows(256, 7)
    with torch.no_grad():
        ref = _massive_llama().model(input_ids=ids).last_hidden_state[:, 1:]
    reports, errors = {}, {}
    for method in ("rtn", "auto"):
        model = _massive_llama()
        reports[method] = quantize_model(model, QuantConfig(bits=8, method=method, **SMALL), calibration=calib)
        with torch.no_grad():
            errors[method] = _rel(model.model(input_ids=ids).last_hidden_state[:, 1:], ref)
    for a, r in zip(reports["auto"].layers, reports["rtn"].layers):  # calibration output error, layer by layer
        assert a.name == r.name and a.rel_error <= r.rel_error, (a.name, a.rel_error, r.rel_error)
    assert errors["rtn"] < 0.015  # measured 0.0080
    assert errors["auto"] <= errors["rtn"]  # measured 0.0054 (0.107 before the fix)


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(method="auto", group_size=32, skip=(), head_bits=8)),  # tied head: quantized and untied
    ("gpt2", dict(method="gptq", group_size=64, symmetric=False)),  # Conv1D projections
    ("bert", dict(method="awq", group_size=32)),  # encoder, input_scale where 1/s cannot be folded
    ("opt", dict(method="rtn", bits=8)),
])
def test_save_load_identical_and_generate(tmp_path, monkeypatch, family, kw):
    model = tiny_model(family)
    quantize(model, calibration=calib_ids(), **kw, **SMALL)
    ids = random_ids()
    before = model_output(model, ids)
    out = models.save(model, word_tokenizer(), tmp_path / "q")
    meta = json.loads((out / models.META_FILE).read_text())
    assert meta["transforms"][-1]["kind"] == "quantize"
    monkeypatch.setattr(memory, "MIN_BYTES", 1)  # every layer's codes count as large: the load path re-homes them
    monkeypatch.delenv("PYSHRINK_HUGEPAGES", raising=False)
    loaded, _ = models.load_model(out)
    torch.testing.assert_close(model_output(loaded, ids), before, rtol=0, atol=0)
    kinds = {type(m) for m in loaded.modules()}
    assert QuantLinear in kinds or QuantLinear8 in kinds
    codes = [m._buffers[m.STREAMED[0]] for m in loaded.modules() if isinstance(m, (QuantLinear, QuantLinear8))]
    assert codes
    if memory.hugepages_enabled():  # then every one sits in hugepage_copy's 2 MiB-aligned mappings
        assert all(c.data_ptr() % (2 << 20) == 0 for c in codes)
    if family == "llama":
        assert isinstance(loaded.lm_head, QuantLinear8) and loaded.model.embed_tokens.weight.dtype == torch.float32
        assert loaded.config.tie_word_embeddings is False
    if family == "bert":
        assert any(getattr(m, "input_scale", None) is not None for m in loaded.modules())
    if adapter_for(loaded).kind == "decoder":
        gen = loaded.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=1)
        assert gen.shape == (1, 11)
        # a loaded model generates exactly what the in-memory quantized one does
        torch.testing.assert_close(gen, model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=1))


def test_post_norm_opt_quantizes_with_calibration():
    """OPT with do_layer_norm_before=False has no final norm: the head's statistics are not needed (it is skipped)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128, do_layer_norm_before=False, word_embed_proj_dim=32)
    model = tf.OPTForCausalLM(cfg).eval()
    ref = model_output(model, random_ids())
    quantize_model(model, QuantConfig(method="awq", bits=8, **SMALL), calibration=calib_ids())
    assert _rel(model_output(model, random_ids()), ref) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_gqa_model_keeps_its_dtype_through_awq(dtype):
    """o_proj's unfoldable AWQ scale (GQA) must not promote a 16-bit model's activations to float32."""
    model = tiny_model("llama").to(dtype)
    ref = model_output(model, random_ids()).float()
    quantize_model(model, QuantConfig(method="awq", group_size=32, **SMALL), calibration=calib_ids())
    assert any(getattr(m, "input_scale", None) is not None for m in model.modules())  # the case in question
    out = model_output(model, random_ids())
    assert out.dtype == dtype and _rel(out.float(), ref) < 0.3



def test_the_output_head_is_skipped_by_default_whatever_its_name():
    import transformers as tf

    model = tf.BertForMaskedLM(tiny_model("bert").config).eval()  # its head is cls.predictions.decoder
    quantize(model, method="rtn", group_size=32)
    assert type(model.cls.predictions.decoder) is torch.nn.Linear
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied
    assert any(isinstance(m, QuantLinear) for m in model.bert.encoder.modules())
    model = tf.BertForMaskedLM(tiny_model("bert").config).eval()
    quantize(model, method="rtn", group_size=32, skip=(), head_bits=8)
    assert isinstance(model.cls.predictions.decoder, QuantLinear8)
