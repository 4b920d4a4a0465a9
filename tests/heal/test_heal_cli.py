import json

import pytest

from heal_helpers import SEQ
from pyshrink import models
from pyshrink.cli import main

ARGS = ["--tokens", "1024", "--seq-len", str(SEQ), "--batch-size", "4", "--grad-accum", "2", "--eval-tokens", "256",
        "--lr", "0.003", "--until-ppl", "0"]


@pytest.fixture()
def folders(student, teacher, tokenizer, texts, tmp_path):
    models.save(student, tokenizer, tmp_path / "student")
    models.save(teacher, tokenizer, tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(texts["train"])
    return tmp_path


def _heal(folders, *extra):
    return main(["heal", str(folders / "student"), "--teacher", str(folders / "teacher"), "--text",
                 str(folders / "train.txt"), "-o", str(folders / "out"), *ARGS, *extra])


def test_cli_heals_and_prints_json(folders, capsys):
    assert _heal(folders, "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens_seen"] == 1024 and summary["stopped"] == "budget"
    assert summary["path"].endswith("checkpoint-best")
    models.load_model(summary["path"])


def test_cli_errors_exit_non_zero(folders, capsys, tokenizer):
    assert _heal(folders, "--tokens", "0") == 2
    assert "tokens" in capsys.readouterr().err
    assert main(["heal", str(folders / "teacher"), "--teacher", str(folders / "teacher"), "--text",
                 str(folders / "train.txt"), "-o", str(folders / "x"), *ARGS]) == 2
    assert "not smaller" in capsys.readouterr().err
    assert _heal(folders) == 0
    assert _heal(folders) == 2  # OUT exists: --resume or --overwrite
    assert "already exists" in capsys.readouterr().err
    assert _heal(folders, "--resume") == 0
    assert "held-out perplexity" in capsys.readouterr().out


def test_a_contracted_folder_heals_and_its_checkpoints_load_back(trained_teacher, tokenizer, texts, tmp_path, capsys):
    from pyshrink.contract import contract

    c = contract((trained_teacher, tokenizer), contraction_ratio=0.5, num_layers_to_contract=2,
                 calibration=texts["train"], seq_len=SEQ, calibration_tokens=1024, eval_tokens=256, progress=False)
    c.save(tmp_path / "contracted")
    models.save(trained_teacher, tokenizer, tmp_path / "teacher")
    (tmp_path / "train.txt").write_text(texts["train"])
    assert main(["heal", str(tmp_path / "contracted"), "--teacher", str(tmp_path / "teacher"), "--text",
                 str(tmp_path / "train.txt"), "-o", str(tmp_path / "out"), "--trainable", "contracted", *ARGS]) == 0
    for name in ("checkpoint-best", "checkpoint-last"):
        healed = models.load_model(tmp_path / "out" / name, with_tokenizer=False)
        assert models.num_params(healed) == models.num_params(c.model)
    meta = json.loads((tmp_path / "out" / "checkpoint-best" / "pyshrink.json").read_text())
    assert meta["transforms"] and meta["heal"]["step"] >= 0 and meta["healed_from"]["teacher"].endswith("teacher")
