"""Settings are validated before any heavy work, with messages that name the valid range; on any error
nothing is written, and the source is never changed."""
import pytest
import torch

import pyshrink
from pyshrink.arch import UnsupportedArchitecture
from pyshrink.errors import DataError, InvalidSetting
from pyshrink.models import fingerprint, save

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 80


def _contract(src, out, **kw):
    kw.setdefault("num_layers_to_contract", 1)
    kw.setdefault("calibration_tokens", 256)
    return pyshrink.contract(src, calibration=kw.pop("calibration", TEXT), out=out, seq_len=32, eval_tokens=64,
                             progress=False, **kw)


def test_the_default_layer_count_is_8_or_every_block_of_a_shallower_model(tiny_folder):
    res = pyshrink.contract(tiny_folder("llama"), calibration=TEXT, seq_len=32, calibration_tokens=256,
                            eval_tokens=64, progress=False)  # 3 blocks, no num_layers_to_contract
    assert res.summary["settings"]["num_layers_to_contract"] == 3 and len(res.summary["layers"]) == 3


@pytest.mark.parametrize("ratio", [0.05, 0.95, 1.5, -0.5])
def test_ratio_out_of_range(tiny_folder, tmp_path, ratio):
    out = tmp_path / "out"
    with pytest.raises(InvalidSetting, match=r"contraction_ratio must be in 0\.1-0\.9"):
        _contract(tiny_folder("llama"), out, contraction_ratio=ratio)
    assert not out.exists()


@pytest.mark.parametrize("n", [0, 4, 100])
def test_num_layers_out_of_range(tiny_folder, tmp_path, n):
    out = tmp_path / "out"
    with pytest.raises(InvalidSetting, match=r"num_layers_to_contract must be in 1\.\.(3|depth)"):
        _contract(tiny_folder("llama"), out, num_layers_to_contract=n)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_a_window_beyond_the_models_positions_is_refused_not_shortened(tiny_folder, tmp_path):
    out = tmp_path / "out"  # the tiny models have 256 positions; the default window (512) is shortened to them
    with pytest.raises(InvalidSetting, match=r"seq_len must be in 2\.\.256, got 1024"):
        pyshrink.contract(tiny_folder("llama"), calibration=TEXT, out=out, seq_len=1024, progress=False)
    assert not out.exists()
    res = pyshrink.contract(tiny_folder("llama"), calibration=TEXT, calibration_tokens=512, eval_tokens=256,
                            num_layers_to_contract=1, progress=False)
    assert res.summary["settings"]["seq_len"] == 256 and res.summary["ppl_final"] > 0


@pytest.mark.parametrize("bad", [dict(num_layers_to_contract=1.5), dict(contraction_ratio="half"),
                                 dict(threshold=-1.0), dict(head_ratio=0.99), dict(criterion="nope")])
def test_other_bad_settings(tiny_folder, tmp_path, bad):
    with pytest.raises(InvalidSetting):
        _contract(tiny_folder("llama"), tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_empty_or_missing_text(tiny_folder, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        _contract(tiny_folder("llama"), tmp_path / "out", calibration=str(empty))
    with pytest.raises(DataError, match="does not exist"):
        _contract(tiny_folder("llama"), tmp_path / "out", calibration=str(tmp_path / "missing.txt"))
    assert not (tmp_path / "out").exists()


def test_prune_vocab_needs_domain_text(tiny_folder, tmp_path):
    with pytest.raises(InvalidSetting, match="prune_vocab needs domain text"):
        _contract(tiny_folder("llama"), tmp_path / "out", calibration=None, prune_vocab=True)


def test_unknown_architecture(tmp_path, tokenizer):
    from transformers import T5Config

    src = tmp_path / "t5"
    T5Config(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32).save_pretrained(src)
    with pytest.raises(UnsupportedArchitecture, match="supports: .*llama"):
        _contract(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_work(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        _contract(tiny_folder("llama"), out)
    assert (out / "keep.txt").read_text() == "mine"


def test_source_is_untouched(tiny_folder, tmp_path):
    src = tiny_folder("gpt2")
    before = fingerprint(src)
    _contract(src, tmp_path / "out", prune_heads=True, prune_vocab=True)
    assert fingerprint(src) == before
    assert (tmp_path / "out" / "pyshrink.json").is_file()


def test_heal_tokens_needs_a_decoder(tiny_folder, tmp_path):
    with pytest.raises(InvalidSetting, match="healing trains next-token prediction, so it needs a decoder"):
        _contract(tiny_folder("bert"), tmp_path / "out", heal_tokens=256)
    assert not (tmp_path / "out").exists()


def test_a_quantized_source_is_refused(tiny_folder, tmp_path):
    src = tmp_path / "q4"
    model, tok = pyshrink.load_model(tiny_folder("llama"))
    pyshrink.quantize(model, bits=4, group_size=32, method="rtn")
    save(model, tok, src)
    out = tmp_path / "out"
    with pytest.raises(InvalidSetting, match="is quantized: .*contract the floating-point model first"):
        _contract(str(src), out)
    assert not out.exists()


def test_no_stage_writes_over_its_source(tiny_folder):
    """contract, quantize and export refuse an output that is, holds or lies in the source, before any work."""
    src = tiny_folder("llama")
    before = fingerprint(src)
    with pytest.raises(InvalidSetting, match="overlaps the source"):
        _contract(str(src), src, overwrite=True)
    from pyshrink.export import export_onnx
    from pyshrink.quantize import QuantConfig
    from pyshrink.quantize.pipeline import quantize_to_folder

    with pytest.raises(InvalidSetting, match="overlaps the source"):
        quantize_to_folder(str(src), src, QuantConfig(method="rtn"), overwrite=True, progress=False)
    with pytest.raises(InvalidSetting, match="overlaps the source"):
        export_onnx(str(src), src.parent, overwrite=True)
    assert fingerprint(src) == before



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_plan_is_kept_in_the_models_dtype(tiny_folder, monkeypatch, dtype):
    # a refit plan is made for every block and kept until the choice: in float64 they took 2x (float32) or 4x
    # (bf16) the memory of all the down projections; they are converted when applied anyway
    from pyshrink import models
    from pyshrink.contract import layer_selection

    seen = []
    choose = layer_selection.choose

    def spy(candidates, *args, **kwargs):
        seen.extend(c for c in candidates if c is not None)
        return choose(candidates, *args, **kwargs)

    monkeypatch.setattr(layer_selection, "choose", spy)
    model, tok = models.load_model(tiny_folder("llama"), dtype=dtype)
    res = pyshrink.contract((model, tok), calibration=TEXT, seq_len=32, calibration_tokens=256, eval_tokens=64,
                            num_layers_to_contract=1, prune_heads=True, progress=False)
    assert len(seen) == 3 and all(c.neurons.weight.dtype == dtype and c.heads.weight.dtype == dtype for c in seen)
    assert res.model.model.layers[res.summary["layers"][0]["layer"]].mlp.down_proj.weight.dtype == dtype


def test_an_in_memory_model_needs_its_tokenizer(tmp_path):
    from tiny import tiny_model

    model = tiny_model("llama")
    for source in (model, (model, None)):
        with pytest.raises(InvalidSetting, match=r"contract needs the model's tokenizer .* pass \(model, tokenizer\)"):
            _contract(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_calibration_must_be_text(tiny_folder, tmp_path):
    with pytest.raises(DataError, match="text must be a string, a file path, or a list of them; got a Tensor"):
        _contract(tiny_folder("llama"), tmp_path / "out", calibration=torch.arange(2, 100))


def test_the_summary_does_not_copy_literal_calibration_text(tiny_folder, tmp_path):
    one_line = "The quick brown fox jumps over the lazy dog. " * 80
    res = _contract(tiny_folder("llama"), None, calibration=one_line)
    assert res.summary["calibration"]["text"] == f"<text, {len(one_line)} chars>"
    assert one_line not in str(res.summary)
    s = res.summary  # and its repr is the numbers, not the module tree
    assert repr(res) == (f"ContractionResult(LlamaForCausalLM, params_before={s['params_before']}, "
                         f"params_after={s['params_after']}, ppl_source={s['ppl_source']!r}, "
                         f"ppl_final={s['ppl_final']!r})")


def test_a_model_with_non_finite_weights_is_refused(tiny_folder, tmp_path):
    from pyshrink.models import load_model

    model, tok = load_model(tiny_folder("llama"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(InvalidSetting, match=r"model.layers.1.mlp.up_proj.weight has non-finite values \(NaN or inf\)"
                                             r".* contracting it would hide that"):
        _contract((model, tok), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_calibration_tokens_are_an_upper_bound(tiny_folder, tmp_path):
    with pytest.raises(InvalidSetting, match="at most 16 tokens of the calibration text were asked for, less than one "
                                             "window of 32"):
        _contract(tiny_folder("llama"), tmp_path / "out", calibration_tokens=16)
