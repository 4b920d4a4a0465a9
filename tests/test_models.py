import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models as tkm, pre_tokenizers

from pyshrink import models
from pyshrink.arch import UnsupportedArchitecture
from pyshrink.errors import InvalidSetting, ModelLoadError
from tiny import VOCAB, random_ids, tiny_model


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(tkm.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")


def test_save_then_load_round_trip(tmp_path):
    model = tiny_model("llama")
    out = models.save(model, tiny_tokenizer(), tmp_path / "m", metadata={"note": "x"})
    assert json.loads((out / models.META_FILE).read_text())["note"] == "x"
    loaded, tok = models.load_model(out)
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok("w5 w6")["input_ids"] == [5, 6]


def test_a_saved_folders_files_are_readable_as_the_umask_allows(tmp_path):
    """safetensors writes its files 0600: a model saved by one account could not be served by another."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = models.save(tiny_model("llama"), tiny_tokenizer(), tmp_path / "m")
    finally:
        os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_atomic_file_replaces_only_what_a_successful_block_wrote(tmp_path):
    f = tmp_path / "rows.json"
    f.write_text("old")
    with models.atomic_file(f) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == tmp_path
        tmp.write_text("new")
        assert f.read_text() == "old"  # not before the block ends
    assert f.read_text() == "new"
    with models.atomic_file(f):  # nothing written (e.g. no matplotlib for a chart): the file stays
        pass
    assert f.read_text() == "new"
    with pytest.raises(RuntimeError):
        with models.atomic_file(f) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert f.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["rows.json"]


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    model = tiny_model("gpt2")

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.save(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no half-written folder, no temp left behind
    monkeypatch.undo()
    models.save(model, None, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        models.save(model, None, tmp_path / "out")
    models.save(model, None, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_transforms_are_replayed_on_load(tmp_path):
    model = tiny_model("opt")
    calls = []

    @models.structure_handler("test-noop")
    def _noop(m, rec):
        calls.append(rec["value"])

    models.record_transform(model, "test-noop", value=7)
    out = models.save(model, None, tmp_path / "m")
    loaded = models.load_model(out, with_tokenizer=False)
    assert calls == [7] and models.transforms_of(loaded) == [{"kind": "test-noop", "value": 7}]
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_transformed_model_reloads_in_16_bits_with_float32_rotary_frequencies(tmp_path, dtype):
    """transformers keeps the rotary frequencies (an unsaved buffer) in float32 whatever the dtype; a transformed
    folder's loader cast them with the model, and the reloaded logits drifted from the saved model's."""
    import pyshrink

    models.save(tiny_model("llama"), tiny_tokenizer(), tmp_path / "src")
    model, tok = models.load_model(tmp_path / "src", dtype=dtype)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    pyshrink.quantize(model, method="rtn", progress=False)
    models.save(model, tok, tmp_path / "q")
    loaded, _ = models.load_model(tmp_path / "q", dtype=dtype)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert loaded.model.embed_tokens.weight.dtype == dtype
    ids = torch.randint(2, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_a_transformed_masked_lm_reloads_with_its_shared_decoder_bias(tmp_path, tie):
    import transformers as tf

    # a tied BertForMaskedLM shares decoder.bias with cls.predictions.bias (stored once, and not a head tied to
    # the embeddings); a transformed model is rebuilt from its config, so the loader must know that tie too
    model = tf.BertForMaskedLM(tiny_model("bert").config.__class__(**{**tiny_model("bert").config.to_dict(),
                                                                       "tie_word_embeddings": tie})).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    models.record_transform(model, "test-noop2", value=1)
    models.structure_handler("test-noop2")(lambda m, rec: None)
    out = models.save(model, None, tmp_path / "m")
    loaded = models.load_model(out, with_tokenizer=False)
    shared = model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert shared == tie and (loaded.cls.predictions.decoder.bias is loaded.cls.predictions.bias) == shared
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_transformed_folder_whose_config_names_no_architecture_loads(tmp_path):
    """The skeleton was built with ``AutoModelForCausalLM(config)``, which transformers refuses (an OSError)."""
    from pyshrink.quantize import quantize

    model = quantize(tiny_model("llama"), bits=4, group_size=32, method="rtn")
    out = models.save(model, None, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    del config["architectures"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = models.load_model(out, with_tokenizer=False)
    ids = random_ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unknown_transform_is_an_error(tmp_path):
    model = tiny_model("opt")
    models.record_transform(model, "teleport")
    out = models.save(model, None, tmp_path / "m")
    with pytest.raises(ModelLoadError, match="teleport"):
        models.load_model(out, with_tokenizer=False)


def _drop_weight(folder, suffix: str) -> str:
    """Remove the first tensor whose name ends with ``suffix`` from ``folder``'s model.safetensors; its name."""
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    gone = next(k for k in sd if k.endswith(suffix))
    save_file({k: v for k, v in sd.items() if k != gone}, f, metadata={"format": "pt"})
    return gone


def _saved(folder, transformed: bool):
    """A tiny model saved to ``folder``; ``transformed`` records a no-op transform, so that loading takes
    pyshrink's own path (read_state_dict) instead of transformers' from_pretrained."""
    model = tiny_model("llama")
    if transformed:
        models.structure_handler("test-noop2")(lambda m, rec: None)
        models.record_transform(model, "test-noop2")
    return models.save(model, None, folder)


@pytest.mark.parametrize("transformed", [False, True])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, transformed):
    out = _saved(tmp_path / "m", transformed)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors|weights"):
        models.load_model(out, with_tokenizer=False)


def test_a_quantized_checkpoint_missing_its_packed_codes_is_an_error(tmp_path):
    """The codes and scales of a quantized layer are buffers; a file without them must not load as zeros."""
    from pyshrink.quantize import quantize

    model = quantize(tiny_model("llama"), bits=4, group_size=32, method="rtn")
    out = models.save(model, None, tmp_path / "q")
    gone = _drop_weight(out, ".packed")
    with pytest.raises(ModelLoadError, match=rf"missing \['{gone}'\]"):
        models.load_model(out, with_tokenizer=False)


@pytest.mark.parametrize("transformed", [False, True])
def test_a_checkpoint_missing_a_weight_is_an_error(tmp_path, transformed):
    """transformers fills a weight its checkpoint lacks with random values and only logs it: refused, in both
    loading paths; the weights that ties restore (GPT-2's head) are not missing."""
    from safetensors.torch import load_file

    out = _saved(tmp_path / "m", transformed)
    gone = _drop_weight(out, "mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match=rf"missing \['{gone}'\]"):
        models.load_model(out, with_tokenizer=False)
    tied = models.save(tiny_model("gpt2"), None, tmp_path / "g")
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    models.load_model(tied, with_tokenizer=False)


@pytest.mark.parametrize("transformed", [False, True])
def test_a_sharded_checkpoint_missing_a_shard_is_an_error(tmp_path, transformed):
    out = _saved(tmp_path / "m", transformed)
    (out / "model.safetensors").rename(out / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=("missing: " if transformed else "") + "model-00002-of-00002.safetensors"):
        models.load_model(out, with_tokenizer=False)


def test_a_corrupt_shard_index_is_an_error(tmp_path):
    out = _saved(tmp_path / "m", transformed=True)
    (out / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="shard index .* is corrupt"):
        models.load_model(out, with_tokenizer=False)


def test_check_output_refuses_an_existing_output_and_any_overlap_with_a_source(tmp_path):
    from pyshrink.errors import InvalidSetting

    src = models.save(tiny_model("llama"), None, tmp_path / "runs" / "src")
    for out in (src, src.parent, src / "sub"):
        with pytest.raises(InvalidSetting, match="overlaps the source"):
            models.check_output(out, overwrite=True, sources=["smollm2-135m", src])  # a name is not on disk
    with pytest.raises(FileExistsError, match="already exists"):
        models.check_output(tmp_path / "runs", sources=[tmp_path / "elsewhere"])
    assert models.check_output(tmp_path / "new", sources=[src]) == (tmp_path / "new").resolve()


def test_check_output_refuses_an_output_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidSetting, match="afile is a file, not a folder"):
        models.check_output(tmp_path / "afile" / "sub" / "out")
    assert models.check_output(tmp_path / "new" / "out") == (tmp_path / "new" / "out").resolve()


def test_check_output_reads_a_source_name_as_load_model_does(tmp_path, monkeypatch):
    """A folder that happens to bear an embedded model's name is not that source."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    out = models.check_output("smollm2-135m/q4", sources=["smollm2-135m"])
    assert out == (tmp_path / "smollm2-135m" / "q4").resolve()


def test_unknown_architecture_is_named(tmp_path):
    cfg = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitecture, match="mamba.*supports: bert, gpt2, llama"):
        models.load_model(tmp_path, with_tokenizer=False)


@pytest.mark.parametrize("source, message", [
    ("/definitely/not/here", "does not exist"),
    ("missing.gguf", "does not exist"),
])
def test_bad_sources(source, message):
    with pytest.raises(ModelLoadError, match=message):
        models.load_model(source)


def test_an_unreachable_hub_id_is_a_one_line_error(monkeypatch):
    import transformers

    def offline(name, **kw):  # what the hub client raises without a network: several lines
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ModelLoadError) as info:
        models.load_model("no-such-model")
    msg = str(info.value)
    assert "'no-such-model' exists here" in msg and "couldn't connect" in msg and "\n" not in msg
    assert isinstance(info.value.__cause__, OSError)


def test_a_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf"):
        models.load_model(f)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_a_folder_saved_without_a_tokenizer_loads_with_none(tmp_path, family):
    # transformers guessed a tokenizer class from the config: a llama folder failed on a missing sentencepiece
    out = models.save(tiny_model(family), None, tmp_path / "m")
    model, tok = models.load_model(out)
    assert tok is None and model is not None


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(tmp_path)


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a").write_text("1")
    f1 = models.fingerprint(tmp_path)
    (tmp_path / "a").write_text("2")
    assert models.fingerprint(tmp_path) != f1


def test_num_params_counts_tied_weights_once():
    model = tiny_model("llama")
    assert models.num_params(model) == sum(p.numel() for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_gguf_file_loads_in_the_dtype_asked_for(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")  # never parsed: the GGUF reader is replaced by one that returns float32, as it does
    monkeypatch.setattr(models, "_load_gguf", lambda path: (tiny_model("llama"), None))
    model, _ = models.load_model(f, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sliding_windows_per_layer_from_configs_with_and_without_layer_types():
    from types import SimpleNamespace

    from pyshrink.models import sliding_windows

    assert sliding_windows(SimpleNamespace(sliding_window=8), 3) == [8, 8, 8]  # Mistral
    assert sliding_windows(SimpleNamespace(sliding_window=None), 3) == [None] * 3
    # Qwen2 before transformers had layer_types: the layers from max_window_layers on slide
    old_qwen2 = SimpleNamespace(sliding_window=8, use_sliding_window=True, max_window_layers=1)
    assert sliding_windows(old_qwen2, 3) == [None, 8, 8]
    assert sliding_windows(SimpleNamespace(sliding_window=8, use_sliding_window=False, max_window_layers=1), 3) == [None] * 3
    typed = SimpleNamespace(sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    assert sliding_windows(typed, 2) == [None, 8]
