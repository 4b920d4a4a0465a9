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
    with pytest.raises(DataError, match=r"token ids in 0\.\."):
        quantize(tiny_model("gpt2"), calibration=torch.full((2048,), model.config.vocab_size), **SMALL)

