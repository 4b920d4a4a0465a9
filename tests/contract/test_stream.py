"""``contract(..., stream=True)`` / ``pyshrink contract --stream``: one block in memory at a time, and the same
folder and summary as the in-memory run."""
import json
import types

import pytest
import torch

from _quantutil import FAMILY_NAMES, tiny_model, word_tokenizer
from _streamutil import assert_a_failure_leaves_nothing, assert_one_block_at_a_time, assert_same_folders, make_sources
from pyshrink import models
from pyshrink.contract import calibration, contract, scores
from pyshrink.errors import InvalidSetting


# what differs between two runs of the same contraction: wall-clock times, and where the result went
_TIMES = ("contraction_time_s", "evaluation_time_s", "wall_time_s", "streamed", "out")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("cstream"))


def _run(root, source, out, stream, calibrated=True, **settings):
    settings = {"contraction_ratio": 0.5, "num_layers_to_contract": 2, "calibration_tokens": 2048,
                "eval_tokens": 1024, "seq_len": 64, **settings}
    return contract(root / source, calibration=[str(root / "calib.txt")] if calibrated else None, out=root / out,
                    progress=False, stream=stream, **settings)


def _assert_same(root, a, b, ra, rb):
    sa, sb = ({k: v for k, v in r.summary.items() if k not in _TIMES} for r in (ra, rb))
    assert sa == sb
    assert rb.summary["streamed"] is True and rb.model is None
    ma, mb = assert_same_folders(root / a, root / b)
    assert ma["transforms"] == mb["transforms"] and ma["source"] == mb["source"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_streamed_contraction_writes_the_in_memory_runs_folder_and_summary(root, family):
    """Neurons, heads and vocabulary, chosen by measurement, on every family."""
    kw = dict(prune_heads=True, prune_vocab=True)
    ra = _run(root, family, f"mem-{family}", False, **kw)
    rb = _run(root, family, f"str-{family}", True, **kw)
    _assert_same(root, f"mem-{family}", f"str-{family}", ra, rb)
    assert ra.summary["params_after"] < ra.summary["params_before"]
    assert len(ra.summary["layers"]) == 2
    assert len(list((root / f"str-{family}").glob("model-*-of-*.safetensors"))) == 4  # 3 blocks + the rest
    loaded, _ = models.load_model(root / f"str-{family}")
    assert models.num_params(loaded) == rb.summary["params_after"]


@pytest.mark.parametrize("settings", [dict(layers=[0, 2], refit="mean"), dict(threshold=0.05, criterion="obs"),
                                      dict(contraction_ratio=0.3, criterion="magnitude", prune_heads=True,
                                           head_ratio=0.5)],
                         ids=["layers", "threshold", "magnitude-heads"])
def test_other_settings_stream_alike(root, settings):
    tag = "-".join(settings)
    settings = {"num_layers_to_contract": None, **settings} if "layers" in settings else settings
    ra = _run(root, "llama", f"mem-s{tag}", False, **settings)
    rb = _run(root, "llama", f"str-s{tag}", True, **settings)
    _assert_same(root, f"mem-s{tag}", f"str-s{tag}", ra, rb)


def test_few_calibration_tokens_are_planned_from_the_tokens_themselves(root, monkeypatch):
    """32 calibration tokens, fewer than half of the MLP's 96 channels and of the attention's 64: every neuron and
    head plan is solved from the held tokens, never from a Gram matrix, and streamed and in-memory runs still agree
    bit for bit. Against the same run planned from the tokens' Gram matrix: the same choices, and the same weights
    to the precision of the Gram matrix's float32 products."""
    solved = {"tokens": 0, "gram": 0}
    for name, key in (("_lstsq_samples", "tokens"), ("_lstsq", "gram")):
        real = getattr(scores, name)
        monkeypatch.setattr(scores, name, lambda *a, _real=real, _key=key, **k: solved.__setitem__(
            _key, solved[_key] + 1) or _real(*a, **k))
    kw = dict(prune_heads=True, calibration_tokens=32, seq_len=32)
    ra = _run(root, "llama", "few-mem", False, **kw)
    rb = _run(root, "llama", "few-str", True, **kw)
    _assert_same(root, "few-mem", "few-str", ra, rb)
    assert solved["tokens"] >= 2 * 3 * 2 and solved["gram"] == 0  # (neurons, heads) x 3 blocks x 2 runs, at least
    by_tokens = solved["tokens"]
    monkeypatch.setattr(calibration, "SAMPLES_PER_CHANNEL", 0.0)
    rc = _run(root, "llama", "few-gram", False, **kw)
    assert solved == {"tokens": by_tokens, "gram": by_tokens // 2}
    assert [(r["layer"], r["heads_after"]) for r in ra.summary["layers"]] == \
        [(r["layer"], r["heads_after"]) for r in rc.summary["layers"]]
    assert ra.summary["params_after"] == rc.summary["params_after"] < ra.summary["params_before"]
    da, dc = models.read_state_dict(root / "few-mem"), models.read_state_dict(root / "few-gram")
    assert da.keys() == dc.keys()
    for k in da:
        torch.testing.assert_close(da[k], dc[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ra.summary["ppl_final"] == pytest.approx(rc.summary["ppl_final"], rel=1e-4)


def test_a_data_free_encoder_and_a_16_bit_source_stream_alike(root):
    ra = _run(root, "bert", "mem-free", False, calibrated=False)
    rb = _run(root, "bert", "str-free", True, calibrated=False)
    _assert_same(root, "mem-free", "str-free", ra, rb)
    assert rb.summary["mode"] == "data-free" and 0 < rb.summary["embedding_cosine"] < 1
    ra = _run(root, "llama-bf16", "mem-bf16", False)
    rb = _run(root, "llama-bf16", "str-bf16", True)
    _assert_same(root, "mem-bf16", "str-bf16", ra, rb)
    assert models.read_state_dict(root / "str-bf16")["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def test_a_contracted_source_contracts_again_streamed(root):
    _run(root, "llama", "once", False, prune_heads=True)
    ra = _run(root, "once", "mem-twice", False, prune_heads=True)
    rb = _run(root, "once", "str-twice", True, prune_heads=True)
    _assert_same(root, "mem-twice", "str-twice", ra, rb)


def test_no_more_than_one_block_is_in_memory_and_the_source_is_untouched(root, monkeypatch):
    # each of the 3 blocks loaded twice: observed, then contracted and written
    assert_one_block_at_a_time(root / "phi", monkeypatch, lambda: _run(root, "phi", "str-once", True), loads=6)


def test_a_failure_midway_leaves_nothing_behind(root, monkeypatch):
    assert_a_failure_leaves_nothing(root / "str-fail", monkeypatch, lambda: _run(root, "opt", "str-fail", True))


def test_what_streaming_cannot_do_is_refused_before_any_block_is_read(root):
    with pytest.raises(InvalidSetting, match="needs calibration text for a decoder"):
        _run(root, "gpt2", "str-nocal", True, calibrated=False)
    with pytest.raises(InvalidSetting, match="heal_tokens trains the whole contracted model"):
        _run(root, "gpt2", "str-heal", True, heal_tokens=1000)
    with pytest.raises(InvalidSetting, match="an in-memory model is already in memory"):
        contract((tiny_model("llama"), word_tokenizer()), calibration=[str(root / "calib.txt")], out=root / "str-pair",
                 stream=True, progress=False)
    with pytest.raises(InvalidSetting, match="pass out=FOLDER"):
        contract(root / "gpt2", calibration=[str(root / "calib.txt")], stream=True, progress=False)
    with pytest.raises(InvalidSetting, match="is quantized"):
        from pyshrink.quantize import QuantConfig
        from pyshrink.quantize.pipeline import quantize_to_folder

        quantize_to_folder(root / "gpt2", root / "q", QuantConfig(method="rtn", group_size=32, progress=False),
                           progress=False)
        _run(root, "q", "str-q", True)
    for out in ("str-nocal", "str-heal", "str-q", "str-pair"):
        assert not (root / out).exists()


def test_cli_stream(root, capsys):
    from pyshrink.cli import main

    rc = main(["contract", str(root / "bert"), "-o", str(root / "cli-str"), "--calibration", str(root / "calib.txt"),
               "--num-layers-to-contract", "2", "--eval-tokens", "1024", "--stream", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    s = json.loads(cap.out[cap.out.index("{"):])
    assert s["streamed"] is True and s["params_after"] < s["params_before"] and 0.9 < s["embedding_cosine"] <= 1
    rc = main(["contract", "smollm2-135m", "-o", str(root / "cli-gguf"), "--calibration", str(root / "calib.txt"),
               "--stream"])
    cap = capsys.readouterr()
    assert rc == 2 and "streaming reads a local folder of .safetensors files" in cap.err
    rc = main(["contract", str(root / "llama"), "-o", str(root / "cli-steps"), "--calibration",
               str(root / "calib.txt"), "--heal-tokens", "1000", "--steps", "2", "--stream"])
    cap = capsys.readouterr()
    assert rc == 2 and "--stream" in cap.err and "--steps" in cap.err
    assert not (root / "cli-gguf").exists() and not (root / "cli-steps").exists()


def test_a_model_whose_float32_weights_exceed_the_available_memory_is_pointed_to_stream(root, monkeypatch, capsys):
    import psutil

    from pyshrink.cli import main

    need = 4 * models.stored_numel(root / "gpt2")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=need - 1))
    rc = main(["contract", str(root / "gpt2"), "-o", str(root / "too-big"), "--calibration", str(root / "calib.txt")])
    err = capsys.readouterr().err
    assert rc == 2 and "in float32, and this machine has" in err and "contract it with --stream" in err
    assert not (root / "too-big").exists()
    _run(root, "gpt2", "fits-streamed", True)  # streaming does not ask


def test_blocks_that_see_different_masks_are_refused_where_the_windows_are_longer_than_the_sliding_one(root,
                                                                                                   monkeypatch):
    """Streaming runs every block with what the first one receives, its attention mask included: Qwen2's sliding
    layers behind a full-attention one would be measured with the wrong mask (the perplexities differed)."""
    import transformers as tf

    import pyshrink.streaming

    # transformers reloads the word-level tokenizer of a qwen2 folder as Qwen2Tokenizer, which reads none of its words
    for module in (models, pyshrink.streaming):
        monkeypatch.setattr(module, "load_tokenizer", lambda path: word_tokenizer())

    from pyshrink.quantize import QuantConfig
    from pyshrink.quantize.pipeline import quantize_to_folder

    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            sliding_window=8, use_sliding_window=True, max_window_layers=1)
    models.save(tf.Qwen2ForCausalLM(config).eval(), word_tokenizer(), root / "qwen2-mixed")
    with pytest.raises(InvalidSetting, match="mixes sliding-window layers"):
        _run(root, "qwen2-mixed", "str-mixed", True)
    with pytest.raises(InvalidSetting, match="mixes sliding-window layers"):
        quantize_to_folder(root / "qwen2-mixed", root / "q-mixed", QuantConfig(method="rtn", group_size=32, seq_len=64,
                                                                               progress=False), progress=False,
                           stream=True)
    assert not (root / "str-mixed").exists() and not (root / "q-mixed").exists()
    ra = _run(root, "qwen2-mixed", "mem-mixed8", False, seq_len=8)  # windows within the sliding one: every mask alike
    rb = _run(root, "qwen2-mixed", "str-mixed8", True, seq_len=8)
    _assert_same(root, "mem-mixed8", "str-mixed8", ra, rb)
