"""Benchmarks: every runtime row has its numbers, memory is measured per process, outputs are written."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # onnx_helpers

from onnx_helpers import tiny_model, word_tokenizer  # noqa: E402
from pyshrink import models  # noqa: E402
from pyshrink.benchmark import bench, chart, markdown_table  # noqa: E402
from pyshrink.errors import InvalidSetting  # noqa: E402

KEYS = ("prefill_ms", "decode_ms_median", "decode_ms_p95", "decode_tokens_per_s", "peak_rss_mb", "disk_mb")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny-llama"
    models.save(tiny_model("llama"), word_tokenizer(), out)
    return out


def test_both_runtimes_export_on_the_fly(tiny_folder, tmp_path):
    rows = bench([str(tiny_folder)], runtime="both", prompt_tokens=8, new_tokens=4, repeats=1, threads=1,
                 export_dir=tmp_path)
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert "error" not in r, r
        assert all(r[k] > 0 for k in KEYS)
        assert r["decode_ms_p95"] >= r["decode_ms_median"]
    (export,) = tmp_path.glob("tiny-llama-*-onnx")
    assert (export / "pyshrink_onnx.json").is_file()
    table = markdown_table(rows)
    assert table.count("\n") == 3 and "tiny-llama" in table
    pytest.importorskip("matplotlib")
    assert chart(rows, tmp_path / "c.png").stat().st_size > 1000


def test_exports_are_reused_only_for_the_same_source(tmp_path):
    """Two models in folders of the same name must not share an export, nor may a model changed since its export."""
    from pyshrink.benchmark import _export_for

    a, b = tmp_path / "v1" / "final", tmp_path / "v2" / "final"
    models.save(tiny_model("llama"), word_tokenizer(), a)
    models.save(tiny_model("gpt2"), word_tokenizer(), b)
    exports = tmp_path / "exports"
    ea, eb = _export_for(str(a), exports, False, None), _export_for(str(b), exports, False, None)
    assert ea != eb
    for src, out in ((a, ea), (b, eb)):
        assert json.loads((out / "pyshrink_onnx.json").read_text())["source"]["source"] == str(src)
    assert _export_for(str(a), exports, False, None) == ea  # unchanged source: the export is reused
    models.save(tiny_model("gpt2"), word_tokenizer(), a, overwrite=True)  # v1 replaced by another model
    ea2 = _export_for(str(a), exports, False, None)
    assert ea2 != ea and json.loads((ea2 / "pyshrink_onnx.json").read_text())["model_type"] == "gpt2"


def test_onnxruntime_needs_an_export_folder(tiny_folder):
    with pytest.raises(InvalidSetting, match="export"):
        bench([str(tiny_folder)], runtime="onnxruntime")
    with pytest.raises(InvalidSetting, match="runtime"):
        bench([str(tiny_folder)], runtime="tensorflow")


def test_a_failing_model_is_reported_in_its_row(tmp_path, capsys):
    from pyshrink.cli import main

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pyshrink_onnx.json").write_text(json.dumps({"kind": "decoder", "model_file": "none.onnx"}))
    rows = bench([str(tmp_path / "broken")], runtime="onnxruntime", prompt_tokens=4, new_tokens=2, repeats=1)
    assert "error" in rows[0]
    assert "error" in markdown_table(rows)
    # the CLI: the row, the whole error on stderr, and a non-zero exit
    code = main(["bench", str(tmp_path / "broken"), "--runtime", "onnxruntime", "--prompt-tokens", "4",
                 "--new-tokens", "2", "--repeats", "1"])
    out, err = capsys.readouterr()
    assert code in (1, 2) and "| broken | onnxruntime | error:" in out
    assert f"pyshrink: error: broken on onnxruntime: {rows[0]['error']}" in err
    assert code == (2 if rows[0]["bad_input"] else 1)


def test_cli_refuses_bad_input_before_measuring_anything(tiny_folder, tmp_path, capsys):
    from pyshrink.cli import main

    assert main(["bench", str(tiny_folder), str(tmp_path / "no-such-model"), "--runtime", "torch"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "does not exist" in err and "measuring" not in err
    for option in ("--json", "--chart"):
        kept = tmp_path / f"kept{option[2:]}"
        kept.write_text("keep me")
        assert main(["bench", str(tiny_folder), "--runtime", "torch", option, str(kept)]) == 2
        err = capsys.readouterr().err
        assert f"{kept} already exists (pass --overwrite" in err and "measuring" not in err
        assert kept.read_text() == "keep me"


def test_cli_refuses_outputs_and_generation_settings_that_do_not_apply_before_measuring(tiny_folder, tmp_path,
                                                                                           capsys):
    from pyshrink.cli import main

    (tmp_path / "adir").mkdir()
    bert = tmp_path / "bert"
    models.save(tiny_model("bert"), word_tokenizer(), bert)
    cases = [
        ([str(tiny_folder), "--json", str(tmp_path / "adir"), "--overwrite"], "adir is a folder: --json and --chart"),
        ([str(bert), "--prompt-tokens", "257"], "prompt_tokens = 257 is more than the 256 positions of the encoder"),
        ([str(tiny_folder), "--prompt-tokens", "250", "--new-tokens", "64"],
         "prompt_tokens + new_tokens = 314 feeds 313 positions, more than the 256 of"),
    ]
    if importlib.util.find_spec("matplotlib"):  # the suffix is checked where the chart can be drawn at all
        cases.append(([str(tiny_folder), "--chart", str(tmp_path / "c.xyz")], "the file name's suffix picks the format"))
    for args, message in cases:
        assert main(["bench", *args, "--runtime", "both"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "measuring" not in err and "exporting" not in err, err
    assert not (tmp_path / "c.xyz").exists()


def test_the_length_check_counts_the_positions_fed(tiny_folder):
    # 200 + 57 feeds 256 positions (the last new token is never fed back): it runs on the 256-position model
    (row,) = bench([str(tiny_folder)], runtime="torch", prompt_tokens=200, new_tokens=57, repeats=1, threads=1)
    assert "error" not in row, row
    with pytest.raises(InvalidSetting, match="prompt_tokens \\+ new_tokens = 258 feeds 257 positions"):
        bench([str(tiny_folder)], runtime="torch", prompt_tokens=200, new_tokens=58)


def test_encoders_are_timed_as_one_forward_pass_in_both_runtimes(tmp_path):
    bert = tmp_path / "tiny-bert"
    models.save(tiny_model("bert"), word_tokenizer(), bert)
    rows = bench([str(bert)], runtime="both", prompt_tokens=16, new_tokens=4, repeats=2, threads=1,
                 export_dir=tmp_path / "exports")
    assert [r["runtime"] for r in rows] == ["torch", "onnxruntime"]
    for r in rows:
        assert "error" not in r, r
        assert r["kind"] == "encoder" and r["new_tokens"] == 0 and r["decode_ms_median"] is None
        assert r["prefill_ms"] > 0 and len(r["prefill_ms_all"]) == 2
        assert r["forward_tokens_per_s"] == pytest.approx(16 / (r["prefill_ms"] / 1e3))
        assert r["peak_rss_mb"] > 0 and r["disk_mb"] > 0
    table = markdown_table(rows)
    assert table.count("(forward)") == 2 and "| - | - |" in table
    (export,) = (tmp_path / "exports").glob("tiny-bert-*-onnx")  # its length is checked up front too
    with pytest.raises(InvalidSetting, match="prompt_tokens = 257 is more than the 256 positions of the encoder"):
        bench([str(export)], runtime="onnxruntime", prompt_tokens=257)
    if importlib.util.find_spec("matplotlib"):
        assert chart(rows, tmp_path / "c.png").stat().st_size > 1000


def test_a_corrupt_export_is_bad_input(tiny_folder, tmp_path):
    from pyshrink import export_onnx

    good = export_onnx(str(tiny_folder), tmp_path / "onnx")
    data = (good / "model.onnx").read_bytes()
    (good / "model.onnx").write_bytes(data[:1000])  # truncated
    (row,) = bench([str(good)], runtime="onnxruntime", prompt_tokens=4, new_tokens=2, repeats=1)
    assert row["bad_input"] and "ModelLoadError: ONNX Runtime cannot load" in row["error"], row


def test_rows_of_models_with_the_same_folder_name_are_told_apart(tmp_path):
    from pyshrink.benchmark import _labels

    assert _labels(["va/final", "vb/final", "x/other"]) == {"va/final": "va/final", "vb/final": "vb/final",
                                                            "x/other": "other"}


def test_ort_genai_peer_runner(tiny_folder, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from pyshrink import export_onnx
    from pyshrink.benchmark import run_one

    export_onnx(str(tiny_folder), tmp_path / "onnx")
    row = run_one("ort-genai", tmp_path / "onnx", prompt_tokens=8, new_tokens=4, repeats=1, threads=1)
    assert "error" not in row, row
    assert row["decode_tokens_per_s"] > 0 and row["disk_mb"] > 0


def test_compiled_torch_rows(tiny_folder, tmp_path):
    gpt2 = models.save(tiny_model("gpt2"), word_tokenizer(), tmp_path / "tiny-gpt2")  # no fused projections
    rows = bench([str(tiny_folder), str(gpt2)], runtime="torch", compile=True, prompt_tokens=8, new_tokens=4,
                 repeats=1, threads=1)
    for r, name in zip(rows, ("tiny-llama", "tiny-gpt2")):
        assert "error" not in r, r
        assert r["label"] == f"{name} (compiled)" and r["options"] == {"compile": True, "fuse": "auto"}
        assert r["compile_s"] > 0 and all(r[k] > 0 for k in KEYS)
    assert rows[0]["fused_groups"] > 0 and rows[1]["fused_groups"] == 0  # Llama fuses q|k|v and gate|up
