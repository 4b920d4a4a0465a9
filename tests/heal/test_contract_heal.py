"""``pyshrink.contract(..., heal_tokens=N)``: the contracted model is healed in place before it is measured.

The teacher is the tiny model trained on Markov text (conftest), so a contraction costs real quality and a heal
has something to recover. The held-out loss is recomputed here with the model's own loss (labels=), not with
pyshrink's perplexity code.
"""
import math

import pytest
import torch

from heal_helpers import SEQ
from pyshrink import data
from pyshrink.contract import contract
from pyshrink.contract.summary import rows
from pyshrink.errors import InvalidSetting

SETTINGS = dict(contraction_ratio=0.75, num_layers_to_contract=3, seq_len=SEQ, calibration_tokens=1024,
                eval_tokens=512, progress=False, seed=0)
HEAL = dict(lr=3e-3, batch_size=4, grad_accum=2, eval_tokens=256, until_ppl=0)


def held_out_loss(model, tokenizer, text) -> float:
    """Mean next-token loss over the first 512 tokens of ``text`` in SEQ-token windows (the windows contract()
    evaluates on), from the model's own loss (labels = inputs)."""
    ids = data.windows(data.tokenize(tokenizer, text), SEQ, 512)
    with torch.no_grad():
        return sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in ids) / len(ids)


def test_heal_tokens_lowers_the_held_out_loss_of_the_same_contraction(trained_teacher, tokenizer, texts):
    source = (trained_teacher, tokenizer)
    kw = dict(calibration=texts["train"], eval_text=texts["eval"], **SETTINGS)
    plain = contract(source, **kw)
    healed = contract(source, **kw, heal_tokens=16 * 256, heal_options=HEAL)

    assert [r["layer"] for r in healed.summary["layers"]] == [r["layer"] for r in plain.summary["layers"]]
    h = healed.summary["heal"]
    assert h["tokens"] == h["tokens_seen"] == 16 * 256 and h["stopped"] == "budget"
    # the same seed gives the same contraction: the heal starts from exactly the un-healed model
    assert h["ppl_before"] == pytest.approx(plain.summary["ppl_final"], rel=1e-6)
    assert healed.summary["ppl_final"] == h["ppl_after"] < 0.85 * h["ppl_before"]
    assert healed.summary["ppl_ratio"] == pytest.approx(healed.summary["ppl_final"] / healed.summary["ppl_source"])
    assert dict(rows(healed.summary))["healing"].startswith("4,096 of 4,096 tokens in ")
    assert "healing" not in dict(rows(plain.summary))

    loss_plain = held_out_loss(plain.model, tokenizer, texts["eval"])
    loss_healed = held_out_loss(healed.model, tokenizer, texts["eval"])
    assert loss_healed < loss_plain - 0.1
    assert math.exp(loss_plain) == pytest.approx(plain.summary["ppl_final"], rel=0.01)
    assert math.exp(loss_healed) == pytest.approx(healed.summary["ppl_final"], rel=0.01)
    assert sum(p.numel() for p in healed.model.parameters()) == sum(p.numel() for p in plain.model.parameters())


def test_the_heal_trains_on_the_calibration_part_only(trained_teacher, tokenizer, texts, monkeypatch):
    """Without eval_text, the last 10% of the calibration text is the evaluation text: the heal never gets it."""
    import pyshrink.heal as heal_pkg

    seen = {}
    real = heal_pkg.heal_in_place

    def spy(model, tok, *, text, **kw):
        seen["text"] = text
        return real(model, tok, text=text, **kw)

    monkeypatch.setattr(heal_pkg, "heal_in_place", spy)
    r = contract((trained_teacher, tokenizer), calibration=texts["train"], **SETTINGS, heal_tokens=2 * 256,
                 heal_options=HEAL)
    ids = data.tokenize(tokenizer, texts["train"])
    cal, held = data.split_ids(ids, 0.1)
    assert torch.equal(seen["text"], cal) and held.numel() > 0
    assert r.summary["heal"]["tokens_seen"] == 2 * 256


def test_heal_then_drop_vocabulary(trained_teacher, tokenizer, texts):
    r = contract((trained_teacher, tokenizer), calibration=texts["train"] + "w5 w6 w7\n",
                 eval_text=texts["eval"], **SETTINGS, prune_vocab=True, heal_tokens=2 * 256, heal_options=HEAL)
    s = r.summary
    assert s["vocab"]["vocab_after"] < s["vocab"]["vocab_before"]
    # ppl_final is the healed model's, with the full vocabulary's normalisation; dropping ids the text never uses
    # only renormalises over the rest, so the figure recorded apart cannot be higher
    assert s["ppl_final"] == s["heal"]["ppl_after"] < s["heal"]["ppl_before"]
    assert s["vocab"]["ppl_renormalised_over_kept_ids"] <= s["ppl_final"] * (1 + 1e-6)


def test_no_heal_by_default_and_with_zero_tokens(trained_teacher, tokenizer, texts):
    for kw in ({}, {"heal_tokens": 0}):
        r = contract((trained_teacher, tokenizer), calibration=texts["train"], **SETTINGS, **kw)
        assert r.summary["heal"] is None


@pytest.mark.parametrize("kw, message", [
    (dict(calibration=None), "heal_tokens needs text to heal on: pass calibration"),
    (dict(heal_tokens=-5), "heal_tokens must be a non-negative integer"),
    (dict(heal_tokens=1.5), "heal_tokens must be an integer"),
    (dict(heal_options={"tokens": 5}), "heal_options: unknown or fixed argument"),
    (dict(heal_options={"learning_rate": 1e-3}), "allowed: .*lr"),
    (dict(heal_options=[("lr", 1e-3)]), "heal_options must be a dict"),
    (dict(heal_tokens=0, heal_options={"lr": 1e-3}), "runs only with heal_tokens"),
])
def test_bad_heal_settings_are_refused_before_any_work(trained_teacher, tokenizer, texts, tmp_path, kw, message):
    args = dict(calibration=texts["train"], heal_tokens=256, **SETTINGS)
    args.update(kw)
    with pytest.raises(InvalidSetting, match=message):
        contract((trained_teacher, tokenizer), out=tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []
