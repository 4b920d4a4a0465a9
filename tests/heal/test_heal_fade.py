"""The fade schedule: neurons fade out (factor 1 -> 0) during the heal and are cut when they contribute nothing."""
import copy

import pytest
import torch

from heal_helpers import SEQ, contract_cli, contract_cli_json, mlp_widths
from pyshrink import data, models
from pyshrink.arch import adapter_for
from pyshrink.cli import main
from pyshrink.errors import InvalidSetting
from pyshrink.heal import heal, iterative_contract
from pyshrink.heal.fade import Fade, channel_means, fade_factor
from pyshrink.heal.trainer import HealConfig, lr_at

HEAL = dict(seq_len=SEQ, batch_size=4, grad_accum=2, eval_tokens=512, lr=3e-3, until_ppl=0)
TPS = 4 * 2 * SEQ  # tokens per optimizer step
CONTRACT = dict(seq_len=SEQ, calibration_tokens=1024, eval_tokens=256)


def _no_hooks(model) -> bool:
    return not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def _fade(model, tokenizer, text, ratio=0.5, layers=(0, 2)):
    """A fade of the neurons pyshrink.contract would remove from ``layers`` of ``model``."""
    from pyshrink.contract import contract

    ranked = contract((model, tokenizer), contraction_ratio=ratio, layers=list(layers), calibration=text,
                      progress=False, **CONTRACT)
    windows = data.windows(data.tokenize(tokenizer, text), SEQ, 1024)
    return Fade(model, ranked.kept_neurons, channel_means(model, ranked.kept_neurons, windows)), ranked


def test_the_factor_falls_linearly_to_zero_in_the_fades_last_step():
    assert [fade_factor(s, 2, 6) for s in range(8)] == [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]
    assert fade_factor(3, 3, 4) == 0.0  # a one-step fade trains that step without the neurons
    with pytest.raises(ValueError, match="at least one step"):
        fade_factor(0, 2, 2)


def test_the_cut_at_factor_zero_leaves_the_logits_as_they_were(trained_teacher, tokenizer, texts):
    model = copy.deepcopy(trained_teacher)
    batch = data.windows(data.tokenize(tokenizer, texts["eval"]), SEQ, 4 * SEQ)
    with torch.no_grad():
        source = model(input_ids=batch).logits
    fade, ranked = _fade(model, tokenizer, texts["train"])
    before_params, pending = models.num_params(model), fade.removed_params()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, source)  # factor 1: the hooks change nothing
        fade.set_factor(0.5)
        half = model(input_ids=batch).logits
        fade.set_factor(0.0)
        faded = model(input_ids=batch).logits
    assert (half - source).abs().max() > 1e-3 and (faded - half).abs().max() > 1e-3  # the factor does act
    with pytest.raises(ValueError, match="fade to 0 first"):
        Fade(copy.deepcopy(model), ranked.kept_neurons, fade.means).cut()
    kept = fade.cut()
    with torch.no_grad():
        cut = model(input_ids=batch).logits
    torch.testing.assert_close(cut, faded, rtol=1e-5, atol=1e-5)  # the faded neurons contributed exactly 0
    assert _no_hooks(model)
    assert mlp_widths(model) == [48, 96, 48]
    assert all(torch.equal(kept[i], ranked.kept_neurons[i].sort().values) for i in (0, 2))
    # the same neurons and size as contraction's (whose refit also gives the down projection a bias)
    assert models.num_params(model) == before_params - pending == models.num_params(ranked.model)
    # the kept up rows are the model's own, not refitted
    assert torch.equal(adapter_for(model).blocks(model)[0].mlp.up_proj.weight, trained_teacher.model.layers[0].mlp.up_proj.weight[kept[0]])


def test_the_cut_model_saves_and_loads_like_any_contracted_one(trained_teacher, tokenizer, texts, tmp_path):
    model = copy.deepcopy(trained_teacher)
    fade, _ = _fade(model, tokenizer, texts["train"], ratio=0.25, layers=(1,))
    fade.set_factor(0.0)
    fade.cut()
    models.save(model, tokenizer, tmp_path / "m")
    back = models.load_model(tmp_path / "m", with_tokenizer=False)
    batch = data.windows(data.tokenize(tokenizer, texts["eval"]), SEQ, 2 * SEQ)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=batch).logits, model(input_ids=batch).logits)
    assert models.num_params(back) == models.num_params(model)


def _logged(log):
    return lambda info: log.append((info["step"], info["lr"], info["loss"]))


@pytest.mark.parametrize("steps,split", [(2, [1, 1]), (1, None)])
def test_the_fade_schedule_reaches_one_shot_size_without_jumps_at_the_cuts(trained_teacher, tokenizer, texts, steps,
                                                                          split):
    from pyshrink.contract import contract

    source = (trained_teacher, tokenizer)
    kept_source = {k: v.clone() for k, v in trained_teacher.state_dict().items()}
    kw = dict(contraction_ratio=0.5, num_layers_to_contract=2, calibration=texts["train"])
    one_shot = contract(source, **kw, **CONTRACT, progress=False)
    log = []
    r = iterative_contract(source, steps=steps, heal_tokens=8 * TPS, eval_text=texts["eval"], progress=False,
                           contract_kwargs=CONTRACT, heal_split=split, heal_schedule="fade", fade_share=0.5,
                           callback=_logged(log), **kw, **HEAL)
    assert r.num_params == models.num_params(one_shot.model) < r.source_params
    assert r.summary["heal_schedule"] == "fade" and _no_hooks(r.model)
    assert all(torch.equal(v, trained_teacher.state_dict()[k]) for k, v in kept_source.items())  # source untouched
    # one heal: one warm-up and one cosine over all 8 steps, each step once
    cfg = HealConfig(tokens=8 * TPS, **{k: v for k, v in HEAL.items() if k not in ("eval_tokens", "until_ppl")})
    assert [s for s, _, _ in log] == list(range(1, 9))
    assert [lr for _, lr, _ in log] == [lr_at(cfg, i) for i in range(8)]
    assert sum(s["tokens"] for s in r.steps) == r.summary["tokens_seen"] == 8 * TPS
    if steps == 2:  # slice 1 fades over steps 0-3; the last fades over 4-5, then the final model trains 6-7
        assert [s["fade_tokens"] for s in r.steps] == [4 * TPS, 2 * TPS]
        assert r.steps[0]["layers"] == r.steps[1]["layers"]
        # the next slice starts (factor 1) from the function the previous one ended with (factor 0): no jump
        assert r.steps[1]["ppl_contracted"] == pytest.approx(r.steps[0]["ppl_faded"], rel=1e-4)
        assert r.steps[1]["optimizer"]["sliced"] == 6 and r.steps[1]["optimizer"]["reset"] == 0
    else:
        assert [s["fade_tokens"] for s in r.steps] == [4 * TPS]
    last = r.steps[-1]
    assert last["ppl_cut"] == pytest.approx(last["ppl_faded"], rel=1e-4)  # the physical cut changed nothing
    assert last["stopped"] == "budget" and last["ppl_healed"] <= last["ppl_cut"]


def test_fade_settings_are_checked(trained_teacher, tokenizer, texts):
    source = (trained_teacher, tokenizer)
    base = dict(steps=2, heal_tokens=8 * TPS, calibration=texts["train"])
    with pytest.raises(InvalidSetting, match="fade_share"):
        iterative_contract(source, **base, heal_schedule="fade", fade_share=1.0)
    with pytest.raises(InvalidSetting, match="fade_share sets the fade"):
        iterative_contract(source, **base, fade_share=0.5)
    with pytest.raises(InvalidSetting, match="every weight of heal_split must be positive"):
        iterative_contract(source, **base, heal_schedule="fade", heal_split=[0, 1])
    with pytest.raises(InvalidSetting, match="max_seconds"):
        iterative_contract(source, **base, heal_schedule="fade", max_seconds=5)
    model = copy.deepcopy(trained_teacher)
    fade, _ = _fade(model, tokenizer, texts["train"])
    kw = dict(tokens=4 * TPS, fade=fade, **HEAL)
    with pytest.raises(InvalidSetting, match="needs segment"):
        heal((model, tokenizer), source, texts["train"], **kw)
    with pytest.raises(InvalidSetting, match="ends with the run"):
        heal((model, tokenizer), source, texts["train"], segment=(0, 4 * TPS), **kw)
    with pytest.raises(InvalidSetting, match="spans no optimizer step"):
        heal((model, tokenizer), source, texts["train"], segment=(TPS, TPS), **kw)
    with pytest.raises(InvalidSetting, match="until_ppl=0"):
        heal((model, tokenizer), source, texts["train"], segment=(0, TPS), **{**kw, "until_ppl": None})
    with pytest.raises(InvalidSetting, match="another model"):
        heal((copy.deepcopy(model), tokenizer), source, texts["train"], segment=(0, TPS), **kw)
    # a model as wide as its teacher heals only with a fade that will make it smaller ...
    with pytest.raises(Exception, match="not smaller"):
        heal((model, tokenizer), source, texts["train"], **HEAL, tokens=4 * TPS)
    # ... and trainable="contracted" trains the fading blocks' MLPs (nothing is narrower yet)
    r = heal((model, tokenizer), source, texts["train"], segment=(0, 2 * TPS), progress=False, trainable="contracted",
             **kw)
    assert r.stopped == "segment" and fade.factor == 0.0
    mlps = {n.split(".mlp.")[0] for n in r.optimizer_state if ".mlp." in n}
    assert mlps == {"model.layers.0", "model.layers.2"}
    fade.cut()
    with pytest.raises(InvalidSetting, match="already cut"):
        heal((model, tokenizer), source, texts["train"], segment=(2 * TPS, 3 * TPS), **kw)




def test_cli_heal_schedule_fade(source_folder, capsys):
    assert main(["contract", "--help"]) == 0
    assert "--fade-share" in capsys.readouterr().out
    s, saved = contract_cli_json(source_folder, capsys, "--layers", "0,2", "--heal-tokens", "4096", "--steps", "2",
                                 "--heal-schedule", "fade", "--fade-share", "0.5")
    assert s["heal_schedule"] == "fade" and [st["layers"] for st in s["steps"]] == [[0, 2], [0, 2]]
    # 4 steps of 1,024 tokens: slice 1 fades over 2, slice 2 over 1, the final model trains 1
    assert [st["fade_tokens"] for st in s["steps"]] == [2048, 1024] and s["tokens_seen"] == 4096
    assert mlp_widths(saved) == [48, 96, 48]
    assert models.num_params(saved) == s["params_after"] < s["params_before"]
    # one step fades one-shot's neurons; the table names the mode
    assert contract_cli(source_folder, "--layers", "0,2", "--heal-tokens", "2048", "--heal-schedule", "fade",
                     "--overwrite") == 0
    assert "faded out during one heal" in capsys.readouterr().out
    assert contract_cli(source_folder, "--heal-tokens", "2048", "--steps", "2", "--fade-share", "0.5",
                     "--overwrite") == 2
    assert "--fade-share sets the fade" in capsys.readouterr().err
    assert main(["contract", str(source_folder / "source"), "-o", str(source_folder / "o2"), "--heal-schedule",
                 "fade"]) == 2
    assert "needs --heal-tokens N and --calibration" in capsys.readouterr().err
