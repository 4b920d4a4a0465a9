"""The continuous schedule: one heal across the cuts, its AdamW state sliced with the neurons contraction kept."""
import copy

import pytest
import torch

from heal_helpers import SEQ
from pyshrink import models
from pyshrink.arch import adapter_for
from pyshrink.errors import InvalidSetting
from pyshrink.heal import heal, iterative_contract
from pyshrink.heal.carry import carry_optimizer_state
from pyshrink.heal.trainer import HealConfig, lr_at

HEAL = dict(seq_len=SEQ, batch_size=4, grad_accum=2, eval_tokens=512, lr=3e-3, until_ppl=0)
TPS = 4 * 2 * SEQ  # tokens per optimizer step
CONTRACT = dict(seq_len=SEQ, calibration_tokens=1024, eval_tokens=256)


def _student(teacher):
    """The teacher with half the MLP neurons of blocks 0 and 2 removed (by pyshrink.contract)."""
    from pyshrink.contract import contract

    return contract((teacher[0], teacher[1]), contraction_ratio=0.5, layers=[0, 2], calibration=teacher[2],
                    progress=False, **CONTRACT)


def _logged(log):
    return lambda info: log.append((info["step"], info["lr"], info["loss"]))


def test_two_segments_with_the_carried_state_train_exactly_like_one_heal(trained_teacher, tokenizer, texts):
    c = _student((trained_teacher, tokenizer, texts["train"]))
    kw = dict(tokens=8 * TPS, eval_text=texts["eval"], progress=False, **HEAL)
    whole, first, second, fresh = [], [], [], []
    heal((copy.deepcopy(c.model), tokenizer), (trained_teacher, tokenizer), texts["train"], callback=_logged(whole),
         **kw)
    a = heal((copy.deepcopy(c.model), tokenizer), (trained_teacher, tokenizer), texts["train"], segment=(0, 3 * TPS),
             callback=_logged(first), **kw)
    assert a.stopped == "segment" and a.tokens_seen == 3 * TPS and a.optimizer_state
    assert all(int(st["step"]) == 3 for st in a.optimizer_state.values())
    b_model = copy.deepcopy(a.model)
    b = heal((a.model, tokenizer), (trained_teacher, tokenizer), texts["train"], segment=(3 * TPS, 8 * TPS),
             optimizer_state=a.optimizer_state, callback=_logged(second), **kw)
    assert b.stopped == "budget" and b.tokens_seen == 8 * TPS
    assert all(int(st["step"]) == 8 for st in b.optimizer_state.values())
    # the same steps, learning rates and losses as the uninterrupted heal: one schedule, one optimizer, one data order
    assert [s for s, _, _ in first + second] == [s for s, _, _ in whole] == list(range(1, 9))
    assert [lr for _, lr, _ in first + second] == [lr for _, lr, _ in whole]
    assert [l for _, _, l in first + second] == pytest.approx([l for _, _, l in whole], rel=1e-5)
    # without the carried state the steps after the cut are different ones
    heal((b_model, tokenizer), (trained_teacher, tokenizer), texts["train"], segment=(3 * TPS, 8 * TPS),
         callback=_logged(fresh), **kw)
    assert fresh[0][2] == pytest.approx(whole[3][2], rel=1e-5)  # the same weights at the cut ...
    assert fresh[1][2] != pytest.approx(whole[4][2], rel=1e-4)  # ... but a fresh optimizer's step differs


def test_contraction_reports_the_kept_neurons_and_the_state_follows_them(trained_teacher, tokenizer, texts):
    from pyshrink.contract import contract

    before = _student((trained_teacher, tokenizer, texts["train"])).model
    after = contract((before, tokenizer), contraction_ratio=0.25, layers=[0, 2], calibration=texts["train"],
                     progress=False, **CONTRACT)
    ad = adapter_for(before)
    assert sorted(after.kept_neurons) == [0, 2]
    for i, keep in after.kept_neurons.items():
        b, a = ad.blocks(before)[i], ad.blocks(after.model)[i]
        assert len(keep) == ad.mlp_width(a) == 36 and ad.mlp_width(b) == 48
        assert torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight[keep])  # the rows that stayed
        assert torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight[keep])
    g = torch.Generator().manual_seed(0)
    state = {n: {"step": torch.tensor(5.0), "exp_avg": torch.randn(p.shape, generator=g),
                 "exp_avg_sq": torch.rand(p.shape, generator=g)} for n, p in before.named_parameters()}
    carried, counts = carry_optimizer_state(state, after.model, after.kept_neurons)
    shapes = {n: p.shape for n, p in after.model.named_parameters()}
    assert all(st["exp_avg"].shape == st["exp_avg_sq"].shape == shapes[n] for n, st in carried.items())
    assert counts == {"sliced": 6, "carried": len(state) - 6, "reset": 0}  # gate, up, down of two blocks
    keep = after.kept_neurons[2]
    for proj, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        name = f"model.layers.2.mlp.{proj}.weight"
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(carried[name][k], state[name][k].index_select(dim, keep))
        assert carried[name]["step"] == 5
    name = "model.layers.1.mlp.down_proj.weight"  # an untouched block keeps its state as it was
    assert carried[name]["exp_avg"] is state[name]["exp_avg"]
    # a contraction that reports no kept neurons: the narrowed tensors start afresh, and the counts say so
    reset, counts = carry_optimizer_state(state, after.model, None)
    assert counts == {"sliced": 0, "carried": len(state) - 6, "reset": 6}
    assert "model.layers.2.mlp.down_proj.weight" not in reset


def test_the_continuous_schedule_is_one_heal_with_cuts_at_the_split(trained_teacher, tokenizer, texts):
    from pyshrink.contract import contract

    source = (trained_teacher, tokenizer)
    kw = dict(contraction_ratio=0.5, num_layers_to_contract=2, calibration=texts["train"])
    one_shot = contract(source, **kw, **CONTRACT, progress=False)
    log = []
    r = iterative_contract(source, steps=3, heal_tokens=8 * TPS, eval_text=texts["eval"], progress=False,
                           contract_kwargs=CONTRACT, heal_split=[1, 1, 2], heal_schedule="continuous",
                           callback=_logged(log), **kw, **HEAL)
    assert r.num_params == models.num_params(one_shot.model) < r.source_params
    assert [s["tokens"] for s in r.steps] == [2 * TPS, 2 * TPS, 4 * TPS]  # cut after 1/4 and 1/2 of the budget
    assert [s["stopped"] for s in r.steps] == ["segment", "segment", "budget"]
    assert [s["layers"] for s in r.steps] == [r.steps[0]["layers"]] * 3
    # one warm-up and one cosine over all 8 steps, not three restarts
    cfg = HealConfig(tokens=8 * TPS, **{k: v for k, v in HEAL.items() if k not in ("eval_tokens", "until_ppl")})
    assert [s for s, _, _ in log] == list(range(1, 9))
    assert [lr for _, lr, _ in log] == [lr_at(cfg, i) for i in range(8)]
    # at each cut the state of the narrowed gate/up/down projections was sliced, the rest carried, none reset
    for s in r.steps[1:]:
        assert s["optimizer"]["sliced"] == 6 and s["optimizer"]["reset"] == 0 and s["optimizer"]["carried"] > 0
    assert "optimizer" not in r.steps[0]
    assert r.steps[-1]["ppl_healed"] <= r.steps[-1]["ppl_contracted"]


def test_continuous_settings_are_checked(trained_teacher, tokenizer, texts):
    source = (trained_teacher, tokenizer)
    with pytest.raises(InvalidSetting, match="heal_schedule must be one of per-slice, continuous"):
        iterative_contract(source, steps=2, heal_tokens=1024, calibration=texts["train"], heal_schedule="smooth")
    with pytest.raises(InvalidSetting, match="max_seconds"):
        iterative_contract(source, steps=2, heal_tokens=1024, calibration=texts["train"], heal_schedule="continuous",
                           max_seconds=10)
    student = _student((trained_teacher, tokenizer, texts["train"])).model
    for bad in ((0, 2 * TPS + 1), (TPS, 0), (0,), ("0", TPS)):
        with pytest.raises(InvalidSetting, match="segment"):
            heal((student, tokenizer), source, texts["train"], tokens=2 * TPS, segment=bad, **HEAL)
    with pytest.raises(InvalidSetting, match="needs segment"):
        heal((student, tokenizer), source, texts["train"], tokens=2 * TPS, optimizer_state={}, **HEAL)
