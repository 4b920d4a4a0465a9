"""Bad settings and bad data fail early with messages that say what is supported or needed."""
import pytest
import torch

from _quantutil import calib_ids, tiny_model, word_text, word_tokenizer
from pyshrink.errors import DataError, InvalidSetting
from pyshrink.quantize import QuantConfig, quantize

SMALL = dict(seq_len=64, min_calib_tokens=256, progress=False)


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(bits=True), "bits must be 4 or 8"),
    (dict(head_bits=2), "head_bits must be 4 or 8"),
    (dict(group_size=48), "group_size must be one of 32, 64, 128"),
    (dict(group_size=256), "group_size must be one of 32, 64, 128"),
    (dict(method="fancy"), "unknown quantization method 'fancy'.*rtn, awq, gptq, auto"),
    (dict(bits=8, symmetric=False), "8-bit weights are symmetric"),
    (dict(clip_min=0.0), "clip_min"),
    (dict(damp=0.0), r"damp must be in \(0, 1\)"),
    (dict(head_bits=4), "remove 'lm_head' from skip"),
    (dict(device="cuda"), "quantize\\(\\) has no setting 'device'; its settings are the fields of QuantConfig: bits,"),
    # values of the wrong type are refused here, not deep in an op or by a comparison with a string
    (dict(bits=4.5), "bits must be 4 or 8, got 4.5"),
    (dict(group_size=64.5), "group_size must be one of 32, 64, 128 .*got 64.5"),
    (dict(symmetric="no"), "symmetric must be True or False, got 'no'"),
    (dict(fast="no"), "fast must be True or False, got 'no'"),
    (dict(clip_min="0.5"), "clip_min must be a number, got '0.5'"),
    (dict(skip=["lm_head", 3]), "skip must be module names or fnmatch patterns \\(strings\\), got 3"),
    (dict(method=None), "unknown quantization method None"),
])
def test_bad_settings(kw, match):
    with pytest.raises(InvalidSetting, match=match):
        quantize(tiny_model("llama"), **kw)


def test_a_vocabulary_pruned_head_that_is_asked_for_is_refused_before_any_change():
    from pyshrink.contract import vocab

    model = tiny_model("llama")
    vocab.apply(model, vocab.kept_ids(torch.arange(5, 200), None, model.config))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidSetting, match="output head lm_head is a CompactHead.*keep it in float"):
        quantize(model, bits=4, head_bits=4, skip=(), method="rtn")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    quantize(model, bits=4, method="rtn")  # the default skips the head: the blocks quantize, the head stays float
    assert type(model.lm_head).__name__ == "CompactHead"


def test_settings_fail_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(InvalidSetting):
        QuantConfig(bits=5)
    with pytest.raises(InvalidSetting):
        quantize(model, group_size=48)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # untouched


def test_double_quantization_refused():
    model = quantize(tiny_model("llama"), method="rtn", progress=False)
    with pytest.raises(InvalidSetting, match="already quantized"):
        quantize(model, method="rtn", progress=False)


def test_empty_calibration_text():
    with pytest.raises(DataError, match="empty"):
        quantize(tiny_model("llama"), calibration="   \n ", tokenizer=word_tokenizer(), **SMALL)


def test_short_calibration_names_the_tokens_needed():
    from pyshrink import data

    text, tok = word_text(50), word_tokenizer()
    n = data.tokenize(tok, text).numel()
    with pytest.raises(DataError, match=rf"has {n} tokens; quantization with calibration needs at least 256"):
        quantize(tiny_model("llama"), calibration=text, tokenizer=tok, **SMALL)
    with pytest.raises(DataError, match="at least 2048"):  # the default
        quantize(tiny_model("llama"), calibration=calib_ids(1000), progress=False)


def test_methods_that_need_data_say_so():
    for method in ("awq", "gptq"):
        with pytest.raises(DataError, match=f"method '{method}' needs calibration text"):
            quantize(tiny_model("llama"), method=method)


def test_text_needs_a_tokenizer():
    with pytest.raises(DataError, match="tokenizer"):
        quantize(tiny_model("llama"), calibration=word_text(3000), **SMALL)


def test_missing_calibration_file():
    with pytest.raises(DataError, match="does not exist"):
        quantize(tiny_model("llama"), calibration="no/such/file.txt", tokenizer=word_tokenizer(), **SMALL)


def test_small_k_is_padded_not_refused():
    # K = 64 with group 128: one zero-padded group per row, as MatMulNBits does
    model = quantize(tiny_model("llama"), group_size=128, calibration=calib_ids(), **SMALL)
    q = model.model.layers[0].self_attn.q_proj
    assert q.packed.shape == (64, 1, 64) and q.group_size == 128


def test_text_calibration_works(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(word_text(3000))
    model = quantize(tiny_model("llama"), calibration=str(f), tokenizer=word_tokenizer(), **SMALL)
    assert model.model.layers[0].mlp.down_proj.__class__.__name__ == "QuantLinear"


def test_calibration_ids_out_of_range_or_too_long_windows_are_refused():
    model = tiny_model("gpt2")
    limit = model.config.n_positions
    with pytest.raises(DataError, match=f"longer than the model's {limit} positions"):
        quantize(model, calibration=torch.randint(0, 100, (2, limit + 1)), **SMALL)
    with pytest.raises(DataError, match=r"has token ids 128\.\.128, but the model knows ids 0\.\.127"):
        quantize(tiny_model("gpt2"), calibration=torch.full((2048,), model.config.vocab_size), **SMALL)



def test_numpy_and_torch_scalars_and_integral_floats_are_plain_settings():
    import numpy as np

    cfg = QuantConfig(bits=torch.tensor(4), group_size=64.0, symmetric=np.False_, damp=torch.tensor(0.25),
                      calib_tokens=np.int64(4096))
    got = (cfg.bits, cfg.group_size, cfg.symmetric, cfg.damp, cfg.calib_tokens)
    assert got == (4, 64, False, 0.25, 4096) and [type(v) for v in got] == [int, int, bool, float, int]


def test_one_skip_name_given_as_a_string_is_one_pattern():
    assert QuantConfig(skip="lm_head").skip == ("lm_head",)
    model = quantize(tiny_model("llama"), method="rtn", skip="lm_head", progress=False)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in float, as skip asked
    assert model.model.layers[0].mlp.down_proj.__class__.__name__ == "QuantLinear"


@pytest.mark.parametrize("pattern,kept", [
    ("self_attn", {"q_proj", "k_proj", "v_proj", "o_proj"}),  # a parent module: the projections inside it
    ("mlp.*", {"gate_proj", "up_proj", "down_proj"}),
    ("down_proj", {"down_proj"}),
    ("model.layers.0.*", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_skip_patterns_name_modules_and_what_is_inside_them(pattern, kept):
    model = quantize(tiny_model("llama"), method="rtn", skip=("lm_head", pattern), progress=False)
    for i, block in enumerate(model.model.layers):
        floats = {n.rsplit(".", 1)[-1] for n, m in block.named_modules() if type(m) is torch.nn.Linear}
        assert floats == (kept if pattern != "model.layers.0.*" or i == 0 else set()), (i, floats)


@pytest.mark.parametrize("pattern", ["self_atn", "fc1", "layers.9.*"])
def test_a_skip_pattern_that_matches_nothing_is_refused(pattern):
    # a typo or another family's names quietly quantized every layer the user meant to keep
    with pytest.raises(InvalidSetting, match=f"skip pattern\\(s\\) '{pattern}' match no projection"):
        quantize(tiny_model("llama"), method="rtn", skip=("lm_head", pattern), progress=False)


@pytest.mark.parametrize("family,pattern", [("llama", "model"), ("llama", "layers"), ("gpt2", "h"), ("llama", "*")])
def test_skip_patterns_that_keep_every_block_in_float_are_refused(family, pattern):
    with pytest.raises(InvalidSetting, match="keeps every projection in floating point"):
        quantize(tiny_model(family), method="rtn", skip=("lm_head", pattern), progress=False)


def test_skipping_every_block_but_quantizing_the_head_is_allowed():
    model = quantize(tiny_model("llama"), method="rtn", skip=("model",), head_bits=8, progress=False)
    from pyshrink.quantize.linear import is_quantized

    assert is_quantized(model.lm_head) and not any(is_quantized(m) for m in model.model.modules())


def test_a_config_and_other_settings_together_are_refused():
    cfg = QuantConfig(method="rtn", progress=False)
    with pytest.raises(InvalidSetting, match=r"got config= and also 'bits', 'seq_len'"):
        quantize(tiny_model("llama"), bits=8, config=cfg, seq_len=64)
    model = quantize(tiny_model("llama"), config=cfg, skip=["lm_head"])  # the defaults, spelled out, are no conflict
    assert model.model.layers[0].mlp.down_proj.__class__.__name__ == "QuantLinear"


@pytest.mark.parametrize("source", ["smollm2-135m", ("model", "tokenizer")])
def test_quantize_takes_a_loaded_model(source):
    with pytest.raises(InvalidSetting, match="quantize\\(\\) quantizes a loaded model in place, got a (str|tuple)"):
        quantize(source, method="rtn")


def test_calibration_ids_must_be_integer_token_ids_of_this_model():
    with pytest.raises(DataError, match="the calibration text must be token ids \\(an integer tensor\\), got a "
                                        "torch.float32 tensor"):
        quantize(tiny_model("llama"), calibration=torch.rand(4096), method="awq", **SMALL)
    with pytest.raises(DataError, match="calibration ids must be 1-D .* got shape \\(2, 2, 1024\\)"):
        quantize(tiny_model("llama"), calibration=torch.zeros(2, 2, 1024, dtype=torch.long), method="awq", **SMALL)
    big = word_tokenizer(n_words=400)  # ids beyond the tiny model's 128
    with pytest.raises(DataError, match=r"the calibration text has token ids \d+\.\.\d+, but the model knows ids "
                                        r"0\.\.127: was it tokenized with another model's tokenizer\?"):
        quantize(tiny_model("llama"), calibration=word_text(3000, vocab=400), tokenizer=big, method="awq", **SMALL)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_any_change(bad):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(InvalidSetting, match=r"model.layers.1.mlp.up_proj.weight has non-finite values \(NaN or inf\)"):
        quantize(model, method="rtn", progress=False)
    assert not any(m.__class__.__name__ == "QuantLinear" for m in model.modules())
