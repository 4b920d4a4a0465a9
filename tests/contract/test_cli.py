"""``pyshrink contract``: summary table or JSON, helpful --help, user errors exit 2 and write nothing."""
import json

import pytest
import torch

from pyshrink.arch import adapter_for
from pyshrink.arch.linears import weight_out_in
from pyshrink.cli import main
from pyshrink.contract import contract
from pyshrink.data import builtin_text
from pyshrink.models import load_model


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "domain.txt"
    p.write_text(builtin_text("pydoc")[:10000])
    return p


def test_help_lists_the_options(capsys):
    assert main(["contract", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--contraction-ratio", "--num-layers-to-contract", "--calibration", "--eval", "--prune-heads",
                "--prune-vocab", "--threshold", "--json", "--overwrite", "0.1-0.9", "--heal-tokens", "--steps",
                "--layers", "3,4,5", "--criterion", "--refit", "lstsq"):
        assert opt in text


def test_json_summary_and_loadable_output(tiny_folder, domain, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["contract", str(tiny_folder("phi")), "-o", str(out), "--num-layers-to-contract", "2",
                 "--contraction-ratio", "0.25", "--calibration", str(domain), "--prune-heads", "--prune-vocab",
                 "--calibration-tokens", "1024", "--eval-tokens", "512", "--json"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("params_before", "params_after", "reduction_pct", "ppl_source", "ppl_final", "layers",
                "wall_time_s", "evaluation", "vocab"):
        assert key in s
    assert [r["width_after"] for r in s["layers"]] == [72, 72]
    model, tok = load_model(out)
    assert model is not None


def test_table_summary(tiny_folder, domain, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["contract", str(tiny_folder("gpt2")), "-o", str(out), "--num-layers-to-contract", "1",
                 "--calibration", str(domain), "--calibration-tokens", "512", "--eval-tokens", "512"]) == 0
    text = capsys.readouterr().out
    assert "params before" in text and "perplexity final" in text and "layers contracted (1)" in text


def _down(model, block: int):
    ad = adapter_for(model)
    m = ad.mlp_out_module(ad.blocks(model)[block])
    return weight_out_in(m).detach(), (m.bias.detach() if m.bias is not None else None)


@pytest.mark.parametrize("criterion, refit", [("magnitude", "none"), ("obs", "mean")])
def test_criterion_and_refit_reach_contraction(tiny_folder, domain, tmp_path, capsys, criterion, refit):
    src, out = tiny_folder("gpt2"), tmp_path / "out"
    common = dict(layers=[1], calibration=[str(domain)], calibration_tokens=512, eval_tokens=512, progress=False)
    assert main(["contract", str(src), "-o", str(out), "--layers", "1", "--calibration", str(domain),
                 "--calibration-tokens", "512", "--eval-tokens", "512", "--criterion", criterion, "--refit", refit,
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["settings"]["criterion"], s["settings"]["refit"]) == (criterion, refit)
    w_cli, b_cli = _down(load_model(out)[0], 1)
    w_api, b_api = _down(contract(str(src), criterion=criterion, refit=refit, **common).model, 1)
    w_def, b_def = _down(contract(str(src), **common).model, 1)
    assert torch.equal(w_cli, w_api) and torch.equal(b_cli, b_api)
    assert not (torch.equal(w_def, w_api) and torch.equal(b_def, b_api))  # the options changed the result
    w_src, b_src = _down(load_model(src)[0], 1)
    # neither refit re-solves the kept weights: they are source columns as they were; only mean moves the bias
    assert all(any(torch.equal(col, w_src[:, j]) for j in range(w_src.shape[1])) for col in w_cli.T)
    assert torch.equal(b_cli, b_src) == (refit == "none")


@pytest.mark.parametrize("args, message", [
    (["--contraction-ratio", "0.95"], "0.1-0.9"),
    (["--num-layers-to-contract", "9"], "1..3"),
    (["--calibration", "/nonexistent/domain.txt"], "does not exist"),
    (["--heal-tokens", "1000"], "heal_tokens needs text to heal on: pass calibration"),
    (["--heal-tokens", "-1", "--calibration", "{domain}"], "non-negative"),
    (["--steps", "2", "--calibration", "{domain}"], "--steps 2 heals after every slice, so it needs --heal-tokens"),
    (["--steps", "2", "--heal-tokens", "1000"], "pass --calibration FILE"),
    (["--steps", "0"], "--steps"),
    (["--steps", "2", "--heal-tokens", "1000", "--calibration", "{domain}", "--prune-vocab"], "cannot take prune_vocab"),
    (["--steps", "8", "--heal-tokens", "1000", "--calibration", "{domain}"], "use fewer steps"),
    (["--layers", "0,0"], "must not repeat"),
    (["--layers", "1,x"], "comma-separated block indices"),
    (["--layers", "3"], r"0..2 (the model has 3 blocks)"),
    (["--layers", "0,1", "--num-layers-to-contract", "2"], "leave out --num-layers-to-contract"),
    (["--refit", "ridge"], "refit must be one of lstsq, mean, none"),
    (["--criterion", "random"], "criterion must be one of fluctuation, obs, magnitude"),
    (["--criterion", "obs", "--threshold", "0.001"], "pass one of them"),
    (["--refit", "mean", "--heal-schedule", "fade", "--heal-tokens", "1000", "--calibration", "{domain}"],
     "--refit does not apply"),
])
def test_user_errors_exit_2_and_write_nothing(tiny_folder, domain, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("COLUMNS", "400")  # click's own errors come in a rich box, which would wrap a long path
    out = tmp_path / "out"
    args = [a.replace("{domain}", str(domain)) for a in args]
    assert main(["contract", str(tiny_folder("gpt2")), "-o", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
