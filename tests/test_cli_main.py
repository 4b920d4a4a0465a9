"""The command line as a user meets it: help, exit codes, one-line errors."""
import os
import subprocess
import sys

import pytest

from pyshrink.cli import COMMANDS


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyshrink", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for name in COMMANDS:
        assert (name if name != "evaluate" else "eval") in r.stdout


def test_eval_on_a_missing_model_is_a_clear_error(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text")
    r = run_cli("eval", str(tmp_path / "nope"), "--text", str(text))
    assert r.returncode == 2
    assert "pyshrink: error:" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [["eval", "m", "--text"], ["heal", "s", "--teacher", "t", "-o", "o", "--text"],
                                 ["contract", "m", "-o", "o", "--calibration"], ["quantize", "m", "-o", "o", "--eval"]])
def test_a_missing_text_file_is_refused_before_any_model_loads(tmp_path, cmd):
    r = run_cli(*cmd, str(tmp_path / "corpus"), env={"COLUMNS": "400"})  # wide: rich would wrap the long path
    assert r.returncode == 2
    # click's own check (its wording), which runs before the command's body loads anything
    assert f"Invalid value for '{cmd[-1]}'" in r.stderr and "does not exist" in r.stderr and "corpus" in r.stderr
    assert "Traceback" not in r.stderr


def test_usage_error_exits_non_zero():
    r = run_cli("eval")
    assert r.returncode == 2
    assert "Missing argument" in r.stderr and "Usage" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", ["eval"])
def test_each_command_has_help(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and "--help" in r.stdout


@pytest.mark.parametrize("opt", ["--max-body-bytes", "--max-prompt-tokens", "--max-tokens", "--max-concurrency"])
def test_serve_refuses_limits_that_would_reject_every_request(tmp_path, opt):
    r = run_cli("serve", str(tmp_path), opt, "0")  # checked before the folder is even looked at
    assert r.returncode == 2 and opt in r.stderr and "Traceback" not in r.stderr


def test_version_and_short_help():
    import pyshrink

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pyshrink {pyshrink.__version__}"
    r = run_cli("contract", "-h")
    assert r.returncode == 0 and "--contraction-ratio" in r.stdout


def test_ctrl_c_inside_a_command_says_so_and_exits_130(tmp_path, monkeypatch, capsys):
    from pyshrink import models
    from pyshrink.cli import main

    def interrupted(*args, **kwargs):  # Ctrl-C while the command works (click turns it into exit 130)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", interrupted)
    text = tmp_path / "t.txt"
    text.write_text("some text")
    assert main(["eval", "some-model", "--text", str(text)]) == 130
    assert capsys.readouterr().err.strip().endswith("pyshrink: interrupted")
