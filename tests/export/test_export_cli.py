"""`pyshrink export` and `pyshrink bench` as a user meets them: results, exit codes, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

from onnx_helpers import tiny_model, word_tokenizer
from pyshrink import models

ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pyshrink", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ))


def test_export_cli_writes_a_validated_folder(tmp_path):
    src = tmp_path / "tiny"
    models.save(tiny_model("opt"), word_tokenizer(), src)
    r = cli("export", src, "-o", tmp_path / "onnx", "--int4", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    assert "max |ORT - PyTorch|" in r.stdout
    meta = json.loads((tmp_path / "onnx" / "pyshrink_onnx.json").read_text())
    assert meta["weights"]["int4"] and meta["validation"]["kv_steps"] >= 3
    r = cli("export", src, "-o", tmp_path / "auto", "--int4", "--accuracy-level", "auto")
    assert r.returncode == 0, r.stderr
    assert "accuracy_level 4 on 13 of 13 projections" in r.stdout
    r = cli("export", src, "-o", tmp_path / "onnx")  # exists
    assert r.returncode == 2 and "already exists" in r.stderr


def test_export_cli_says_when_the_export_holds_no_tokenizer(tmp_path):
    """A decoder saved without a tokenizer exports (its graph is valid), but generate and serve could not read
    text with it: the CLI says so at export time."""
    src = tmp_path / "tiny"
    models.save(tiny_model("opt"), None, src)
    r = cli("export", src, "-o", tmp_path / "onnx")
    assert r.returncode == 0, r.stderr
    assert "holds no tokenizer.json" in r.stderr and not (tmp_path / "onnx" / "tokenizer.json").exists()
    models.save(tiny_model("opt"), word_tokenizer(), tmp_path / "with")
    r = cli("export", tmp_path / "with", "-o", tmp_path / "onnx2")
    assert r.returncode == 0 and "holds no tokenizer.json" not in r.stderr, r.stderr


def test_export_cli_errors(tmp_path):
    r = cli("export", tmp_path / "missing", "-o", tmp_path / "o")
    assert r.returncode == 2 and "pyshrink: error:" in r.stderr and "does not exist" in r.stderr
    r = cli("export", "smollm2-135m", "-o", tmp_path / "o", "--group-size", "48")
    assert r.returncode == 2 and "group_size" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_cli_errors(tmp_path):
    r = cli("bench", tmp_path, "--runtime", "tensorflow")
    assert r.returncode == 2 and "runtime must be one of" in r.stderr


def test_the_cli_default_accuracy_level_validates_where_level_4_alone_fails(tmp_path):
    from onnx_helpers import outlier_llama

    src = tmp_path / "outlier"
    models.save(outlier_llama(), word_tokenizer(), src)
    r = cli("export", src, "-o", tmp_path / "four", "--int4", "--accuracy-level", "4")
    assert r.returncode != 0 and "accuracy_level='auto'" in r.stderr and not (tmp_path / "four").exists()
    r = cli("export", src, "-o", tmp_path / "default", "--int4")  # auto: level 0 only where level 4 breaks
    assert r.returncode == 0, r.stderr
    levels = json.loads((tmp_path / "default" / "pyshrink_onnx.json").read_text())["weights"]["accuracy_levels"]
    assert {n for n, lvl in levels.items() if lvl == 0} == {"layers.1.mlp.gate_up"}
