"""``pyshrink quantize``: a thin layer over the Python API, with a summary and clean user errors."""
import json
import re

import pytest

from _quantutil import tiny_model, word_text, word_tokenizer
from pyshrink import models


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    models.save(tiny_model("llama"), word_tokenizer(), root / "src")
    (root / "calib.txt").write_text(word_text(6000))
    return root


def _main(args, capsys):
    from pyshrink.cli import main

    rc = main([*args, "--eval-tokens", "2048"])
    return rc, capsys.readouterr()


def test_cli_quantize_json(source, capsys):
    out = source / "q4"
    rc, cap = _main(["quantize", str(source / "src"), "-o", str(out), "--bits", "4", "--group-size", "32",
                     "--method", "auto", "--calibration", str(source / "calib.txt"), "--seq-len", "64", "--json"],
                    capsys)
    assert rc == 0, cap.err
    s = json.loads(cap.out.strip().splitlines()[-1])
    assert s["metric"] == "perplexity" and s["method"] == "auto"
    assert s["after"] / s["before"] < 1.1 and s["out_bytes"] < s["source_bytes"]
    assert 4.9 < s["bits_per_weight_quantized"] < 5.1 and len(s["layers"]) == 21
    loaded, _ = models.load_model(out)
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"


def test_cli_quantize_table(source, capsys):
    # --calibration-tokens: contract's name for the same setting (--calib-tokens still works)
    rc, cap = _main(["quantize", str(source / "src"), "-o", str(source / "q8"), "--bits", "8", "--method", "rtn",
                     "--calibration", str(source / "calib.txt"), "--seq-len", "64", "--head-bits", "8",
                     "--calibration-tokens", "4096"], capsys)
    assert rc == 0, cap.err
    for needle in ("weights on disk", "bits per weight", "perplexity", "per-layer relative output error", "down_proj",
                   "4,096 calibration tokens"):
        assert needle in cap.out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_a_16_bit_source_keeps_its_float_weights_in_16_bits(source, capsys, dtype):
    """The embedding, norms and float head of a bf16/fp16 source were stored in float32 (twice the source's
    bytes) and the summary said the source had 32 bits per weight."""
    import torch
    from safetensors import safe_open

    src = source / f"src-{dtype}"
    models.save(tiny_model("llama").to(getattr(torch, dtype)), word_tokenizer(), src)
    out = source / f"q-{dtype}"
    rc, cap = _main(["quantize", str(src), "-o", str(out), "--method", "rtn", "--group-size", "32",
                     "--calibration", str(source / "calib.txt"), "--seq-len", "64", "--json"], capsys)
    assert rc == 0, cap.err
    s = json.loads(cap.out.strip().splitlines()[-1])
    assert s["source_bits_per_weight"] == 16
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        dtypes = {k: st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == {"bfloat16": "BF16"}.get(dtype, "F16")
    assert {dtypes[k] for k in dtypes if k.endswith(".scales")} == {"F32"}  # the kernels' scales stay float32
    loaded, _ = models.load_model(out)  # float32 by default: the 16-bit values, widened
    from pyshrink.evaluate import perplexity

    assert s["after"] == pytest.approx(perplexity(loaded, ids=_eval_ids(out), seq_len=64, progress=False), rel=1e-5)
    rc, cap = _main(["quantize", str(src), "-o", str(source / f"qt-{dtype}"), "--method", "rtn", "--group-size", "32",
                     "--calibration", str(source / "calib.txt"), "--seq-len", "64"], capsys)
    assert re.search(r"bits per weight \(quantized layers\)\s+16\s", cap.out), cap.out


def _eval_ids(out):
    """The held-out ids the summary's perplexity was measured on (the last 10 % of calib.txt, up to 2,048)."""
    from pyshrink import data

    tok = models.load_model(out)[1]
    ids = data.tokenize(tok, data.read_texts(out.parent / "calib.txt"))
    return data.split_ids(ids, 0.1)[1][:2048]


@pytest.mark.parametrize("args,needle", [
    (["--bits", "3"], "bits must be 4 or 8"),
    (["--group-size", "100"], "group_size must be one of 32, 64, 128"),
    (["--method", "magic"], "unknown quantization method"),
    (["--bits", "8", "--asymmetric"], "symmetric"),
    (["--method", "gptq"], "method 'gptq' needs calibration text"),
    (["--seq-len", "257"], "seq_len must be in 2..256, got 257"),  # the tiny model has 256 positions
])
def test_cli_bad_settings_exit_2(source, capsys, args, needle):
    rc, cap = _main(["quantize", str(source / "src"), "-o", str(source / "bad"), *args], capsys)
    assert rc == 2 and needle in cap.err


@pytest.mark.parametrize("args,needle", [
    (["--eval-tokens", "-5"], "eval_tokens must be an integer >= 2"),
    (["--seq-len", "64", "--eval-tokens", "32"], "must be at least one 64-token window"),
])
def test_cli_bad_eval_tokens_exit_2(source, capsys, args, needle):
    from pyshrink.cli import main

    assert main(["quantize", str(source / "src"), "-o", str(source / "bad"), "--method", "rtn", *args]) == 2
    assert needle in capsys.readouterr().err and not (source / "bad").exists()


def test_cli_a_short_calibration_text_is_named_as_the_short_one(source, capsys, tmp_path):
    from pyshrink.cli import main

    short = tmp_path / "short.txt"
    short.write_text(" ".join(f"w{2 + i % 100}" for i in range(100)))  # its held-out 10%: ~10 tokens
    assert main(["quantize", str(source / "src"), "-o", str(tmp_path / "q"), "--method", "rtn", "--seq-len", "64",
                 "--calibration", str(short)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the calibration text has \d+ tokens, so its held-out last 10% \(\d+ tokens\) is shorter than "
                     r"one 64-token window", err) and "--eval" in err, err
    assert not (tmp_path / "q").exists()


def test_cli_refuses_existing_output_and_quantized_input(source, capsys):
    out = source / "exists"
    out.mkdir()
    rc, cap = _main(["quantize", str(source / "src"), "-o", str(out), "--method", "rtn"], capsys)
    assert rc == 2 and "already exists" in cap.err
    q = source / "q-rtn"
    assert _main(["quantize", str(source / "src"), "-o", str(q), "--method", "rtn", "--json"], capsys)[0] == 0
    rc, cap = _main(["quantize", str(q), "-o", str(source / "twice"), "--method", "rtn"], capsys)
    assert rc == 2 and "already quantized" in cap.err


def test_cli_quantizes_an_encoder_with_a_task_head(source, capsys):
    import transformers as tf

    model = tf.BertForSequenceClassification(tiny_model("bert").config).eval()  # no last_hidden_state output
    models.save(model, word_tokenizer(), source / "cls")
    rc, cap = _main(["quantize", str(source / "cls"), "-o", str(source / "cls-q"), "--method", "rtn",
                     "--group-size", "32", "--seq-len", "64", "--eval", str(source / "calib.txt"), "--json"], capsys)
    assert rc == 0, cap.err
    s = json.loads(cap.out.strip().splitlines()[-1])
    assert s["metric"] != "perplexity" and 0.9 < s["after"] <= 1.0 + 1e-6
