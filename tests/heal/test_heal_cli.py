import json

import pytest

from heal_helpers import SEQ, contract_cli, contract_cli_json, mlp_widths
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


def test_a_bad_max_minutes_is_named_as_the_option_in_minutes(folders, capsys):
    """The message named the API's max_seconds and the value converted to seconds (-60.0 for -1)."""
    assert _heal(folders, "--max-minutes", "-1") == 2
    err = capsys.readouterr().err
    assert "--max-minutes must be in 0.0-" in err and "got -1.0" in err and "max_seconds" not in err
    assert not (folders / "out").exists()


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


# ---- pyshrink contract --heal-tokens / --steps ----------------------------------------------------------------


def test_contract_heal_tokens_reports_the_heal(source_folder, capsys):
    s, saved = contract_cli_json(source_folder, capsys, "--contraction-ratio", "0.75", "--num-layers-to-contract", "3",
                                 "--heal-tokens", "2048")
    h = s["heal"]
    assert h["tokens"] == 2048 and 0 < h["tokens_seen"] <= 2048 and h["seconds"] > 0
    assert s["ppl_final"] == h["ppl_after"] and h["ppl_before"] > s["ppl_source"]
    assert models.num_params(saved) == s["params_after"]
    assert json.loads((source_folder / "out" / "pyshrink.json").read_text())["contraction"]["heal"]["tokens"] == 2048


def test_contract_steps_runs_the_iterative_schedule(source_folder, capsys):
    s, saved = contract_cli_json(source_folder, capsys, "--layers", "0,2", "--heal-tokens", "2048", "--steps", "2")
    assert [st["slice"] for st in s["steps"]] == [1, 2]
    assert [st["layers"] for st in s["steps"]] == [[0, 2], [0, 2]]
    assert s["tokens_seen"] == sum(st["tokens"] for st in s["steps"]) <= 2048
    assert s["ppl_final"] == s["steps"][-1]["ppl_healed"] and s["ppl_source"] == s["steps"][-1]["ppl_teacher"]
    assert mlp_widths(saved) == [48, 96, 48]  # half of 96 in blocks 0 and 2, in 2 slices
    assert models.num_params(saved) == s["params_after"] < s["params_before"]


def test_contract_steps_continuous_heals_once_across_the_cuts(source_folder, capsys):
    assert main(["contract", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--heal-schedule" in text and "--heal-split" in text
    s, saved = contract_cli_json(source_folder, capsys, "--layers", "0,2", "--heal-tokens", "4096", "--steps", "2",
                                 "--heal-schedule", "continuous", "--heal-split", "1:3")
    # one heal of 4 steps of 1,024 tokens (seq_len 256 x grad_accum 4): slice 2 is cut after the first
    assert s["steps"][0]["tokens"] == 1024 and s["tokens_seen"] <= 4096
    assert s["steps"][0]["stopped"] == "segment" and "optimizer" not in s["steps"][0]
    # slice 2 narrowed gate, up and down of blocks 0 and 2: their AdamW state was sliced, nothing started afresh
    assert s["steps"][1]["optimizer"]["sliced"] == 6 and s["steps"][1]["optimizer"]["reset"] == 0
    assert mlp_widths(saved) == [48, 96, 48]
    assert contract_cli(source_folder, "--heal-tokens", "2048", "--heal-schedule", "continuous", "--overwrite") == 2
    assert "--steps K" in capsys.readouterr().err
    assert contract_cli(source_folder, "--heal-tokens", "2048", "--steps", "2", "--heal-split", "1:x", "--overwrite") == 2
    assert "--heal-split takes colon-separated weights" in capsys.readouterr().err
    assert contract_cli(source_folder, "--heal-tokens", "2048", "--steps", "2", "--heal-split", "1:1:1",
                     "--overwrite") == 2
    assert "heal_split must hold 2" in capsys.readouterr().err
    # the table: a slice with weight 0 is cut without healing (nothing measured), and the mode says one heal
    assert contract_cli(source_folder, "--layers", "0,2", "--heal-tokens", "2048", "--steps", "2", "--heal-split", "0:1",
                     "--heal-schedule", "continuous", "--overwrite") == 0
    text = capsys.readouterr().out
    assert "slices cut during one heal" in text and "slice 1" in text and "not healed" in text


def test_contract_block_slices_cut_each_block_once(source_folder, capsys):
    s, saved = contract_cli_json(source_folder, capsys, "--layers", "0,2", "--heal-tokens", "2048", "--steps", "2",
                                 "--slices", "blocks")
    assert [step["layers"] for step in s["steps"]] == [[2], [0]]  # the deeper block first
    assert mlp_widths(saved) == [48, 96, 48]
    assert contract_cli(source_folder, "--heal-tokens", "2048", "--slices", "blocks", "--overwrite") == 2
    assert "--slices" in capsys.readouterr().err
    assert contract_cli(source_folder, "--heal-tokens", "2048", "--steps", "2", "--slices", "block", "--overwrite") == 2
    assert "--slices must be one of ratio, blocks" in capsys.readouterr().err


def test_contract_steps_table(source_folder, capsys):
    assert contract_cli(source_folder, "--num-layers-to-contract", "1", "--heal-tokens", "1024", "--steps", "2") == 0
    text = capsys.readouterr().out
    assert "slice 1" in text and "slice 2" in text and "perplexity final" in text and "reduction" in text


def test_contract_steps_defaults_to_every_block_of_a_shallow_model(source_folder, capsys):
    # the tiny model has 3 blocks: without --num-layers-to-contract the schedule contracts all 3 (contract's
    # default, min(8, depth)), as one-shot contraction does, instead of failing on 8 after loading the model
    s, saved = contract_cli_json(source_folder, capsys, "--heal-tokens", "2048", "--steps", "2")
    assert [st["layers"] for st in s["steps"]] == [[0, 1, 2], [0, 1, 2]]
    assert mlp_widths(saved) == [48, 48, 48]
    # --slices blocks without --layers chooses the blocks first; its progress line must not break --json
    s, saved = contract_cli_json(source_folder, capsys, "--heal-tokens", "2048", "--steps", "2", "--slices", "blocks",
                                 "--overwrite")
    assert sorted(b for st in s["steps"] for b in st["layers"]) == [0, 1, 2]
    assert mlp_widths(saved) == [48, 48, 48]


def test_contract_steps_refuses_a_ratio_out_of_range_before_any_work(source_folder, capsys):
    for ratio in ("0.95", "0.05"):
        assert contract_cli(source_folder, "--heal-tokens", "2048", "--steps", "2", "--contraction-ratio", ratio) == 2
        err = capsys.readouterr().err
        assert f"contraction_ratio must be in 0.1-0.9, got {ratio}" in err, err
        assert not (source_folder / "out").exists()
