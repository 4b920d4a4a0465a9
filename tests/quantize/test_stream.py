"""``quantize_to_folder(..., stream=True)`` / ``pyshrink quantize --stream``: one block in memory at a time, and the
same folder and numbers as the in-memory run."""
import json

import pytest
import torch

from _quantutil import FAMILY_NAMES, tiny_model, word_tokenizer
from _streamutil import assert_a_failure_leaves_nothing, assert_one_block_at_a_time, assert_same_folders, make_sources
from pyshrink import models
from pyshrink.quantize.config import QuantConfig
from pyshrink.quantize.pipeline import quantize_to_folder
from pyshrink.streaming import StreamedModel


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_sources(tmp_path_factory.mktemp("stream"))


def _run(root, source, out, stream, calibrated=True, **settings):
    cfg = QuantConfig(**{"bits": 4, "group_size": 32, "method": "auto" if calibrated else "rtn", "seq_len": 64,
                         "progress": False, **settings})
    return quantize_to_folder(root / source, root / out, cfg, calibration=[root / "calib.txt"] if calibrated else None,
                              eval_tokens=2048, progress=False, stream=stream)


def _assert_same(root, a, b, ra, rb):
    assert (ra.before, ra.after, ra.params) == (rb.before, rb.after, rb.params)
    assert [l.rel_error for l in ra.report.layers] == [l.rel_error for l in rb.report.layers]
    meta_a, meta_b = assert_same_folders(root / a, root / b)
    assert meta_a["transforms"] == meta_b["transforms"] and meta_a["quality"] == meta_b["quality"]


@pytest.mark.parametrize("calibrated", [True, False], ids=["auto", "rtn"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_streamed_run_writes_the_in_memory_runs_folder_and_numbers(root, family, calibrated):
    tag = f"{family}-{calibrated}"
    ra = _run(root, family, f"mem-{tag}", False, calibrated)
    rb = _run(root, family, f"str-{tag}", True, calibrated)
    _assert_same(root, f"mem-{tag}", f"str-{tag}", ra, rb)
    assert len(list((root / f"str-{tag}").glob("model-*-of-*.safetensors"))) == 4  # 3 blocks + the rest
    loaded, _ = models.load_model(root / f"str-{tag}")
    assert type(loaded.get_submodule(StreamedModel(root / family).blocks_name)[0]).__name__ != "Linear"


@pytest.mark.parametrize("settings", [dict(bits=8), dict(head_bits=4, skip=()), dict(skip=("lm_head", "down_proj"))],
                         ids=["8-bit", "head", "skip"])
def test_settings_that_change_the_head_and_the_skipped_layers_stream_alike(root, settings):
    tag = "-".join(map(str, settings.values())).replace("'", "").replace(" ", "")
    ra = _run(root, "llama", f"mem-s{tag}", False, **settings)
    rb = _run(root, "llama", f"str-s{tag}", True, **settings)
    _assert_same(root, f"mem-s{tag}", f"str-s{tag}", ra, rb)


def test_a_16_bit_source_streams_to_the_same_16_bit_folder(root):
    ra = _run(root, "llama-bf16", "mem-bf16", False)
    rb = _run(root, "llama-bf16", "str-bf16", True)
    _assert_same(root, "mem-bf16", "str-bf16", ra, rb)
    assert models.read_state_dict(root / "str-bf16")["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_a_contracted_source_streams_alike(root):
    from pyshrink.cli import main

    assert main(["contract", str(root / "gpt2"), "-o", str(root / "gpt2-c"), "--num-layers-to-contract", "2",
                 "--prune-heads", "--prune-vocab", "--calibration", str(root / "calib.txt"), "--eval-tokens", "1024",
                 "--calibration-tokens", "2048", "--json"]) == 0
    ra = _run(root, "gpt2-c", "mem-c", False)
    rb = _run(root, "gpt2-c", "str-c", True)
    _assert_same(root, "mem-c", "str-c", ra, rb)


def test_no_more_than_one_block_is_in_memory_and_the_source_is_untouched(root, monkeypatch):
    assert_one_block_at_a_time(root / "phi", monkeypatch, lambda: _run(root, "phi", "str-once", True), loads=3)


def test_a_failure_midway_leaves_nothing_behind(root, monkeypatch):
    assert_a_failure_leaves_nothing(root / "str-fail", monkeypatch, lambda: _run(root, "opt", "str-fail", True))


def test_cli_stream(root, capsys):
    from pyshrink.cli import main

    rc = main(["quantize", str(root / "bert"), "-o", str(root / "cli-str"), "--group-size", "32", "--calibration",
               str(root / "calib.txt"), "--eval-tokens", "2048", "--stream", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    s = json.loads(cap.out.strip().splitlines()[-1])
    assert s["metric"] == "embedding cosine similarity" and 0.99 < s["after"] <= 1.0
    rc = main(["quantize", "smollm2-135m", "-o", str(root / "cli-gguf"), "--stream"])
    cap = capsys.readouterr()
    assert rc == 2 and "streaming reads a local folder of .safetensors files" in cap.err
    assert not (root / "cli-gguf").exists()


def test_a_config_without_architectures_or_dtype_is_written_as_the_in_memory_save_writes_it(root):
    """save_pretrained stamps both on the config; the streamed run wrote the source's config without them."""
    import shutil

    shutil.copytree(root / "llama-bf16", root / "bare")
    config = json.loads((root / "bare" / "config.json").read_text())
    del config["architectures"], config["dtype"]
    (root / "bare" / "config.json").write_text(json.dumps(config))
    ra = _run(root, "bare", "mem-bare", False)
    rb = _run(root, "bare", "str-bare", True)
    _assert_same(root, "mem-bare", "str-bare", ra, rb)
    written = json.loads((root / "str-bare" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["dtype"] == "bfloat16"


def test_a_non_finite_weight_is_named_with_its_block(root):
    from pyshrink.errors import InvalidSetting

    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    models.save(model, word_tokenizer(), root / "nan")
    with pytest.raises(InvalidSetting, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has non-finite values"):
        _run(root, "nan", "str-nan", True)
    assert not (root / "str-nan").exists()


def test_a_model_whose_float32_weights_exceed_the_available_memory_is_pointed_to_stream(root, monkeypatch, capsys):
    """A whole load that cannot fit was left to the system to kill part way, with no message of pyshrink's."""
    import types

    import psutil

    from pyshrink.cli import main

    need = 4 * models.stored_numel(root / "llama")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=need - 1))
    rc = main(["quantize", str(root / "llama"), "-o", str(root / "too-big"), "--method", "rtn"])
    err = capsys.readouterr().err
    assert rc == 2 and "in float32, and this machine has" in err and "--stream" in err
    assert not (root / "too-big").exists()
    _run(root, "llama", "fits-streamed", True, calibrated=False)  # streaming does not ask
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=need))
    _run(root, "llama", "fits", False, calibrated=False)
