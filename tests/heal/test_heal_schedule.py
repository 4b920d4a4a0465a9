import copy
import math
from types import SimpleNamespace

import pytest

from heal_helpers import SEQ, contract_mlp, mlp_widths
from pyshrink import models
from pyshrink.errors import InvalidSetting
from pyshrink.heal import iterative_contract
from pyshrink.heal.schedule import block_groups, slice_ratios, split_budget

HEAL = dict(seq_len=SEQ, batch_size=4, grad_accum=2, eval_tokens=512, lr=3e-3, until_ppl=0)


def fake_contract(calls, choose=None):
    """Stand-in for pyshrink.contract: drop the lowest-norm MLP neurons of N blocks (``choose(widths, n)``, by
    default the widest, ties to the first), or of ``layers`` when given."""
    def contract(source, *, contraction_ratio, num_layers_to_contract, calibration, layers=None):
        model, tok = source
        model = copy.deepcopy(model)
        widths = mlp_widths(model)
        if layers is None:
            layers = (choose or (lambda w, n: sorted(range(len(w)), key=lambda i: (-w[i], i))[:n]))(
                widths, num_layers_to_contract)
        for i in layers:
            contract_mlp(model, keep=round(widths[i] * (1 - contraction_ratio)), layers=[i])
        calls.append((contraction_ratio, widths))
        return SimpleNamespace(model=model, tokenizer=tok, summary={"layers": [{"layer": i} for i in sorted(layers)]})
    return contract


@pytest.mark.parametrize("ratio,steps", [(0.5, 2), (0.3, 3), (0.75, 4)])
def test_slices_compose_to_the_one_shot_ratio(ratio, steps):
    kept = math.prod(1 - r for r in slice_ratios(ratio, steps))
    assert kept == pytest.approx(1 - ratio)


def test_iterative_schedule_reaches_the_one_shot_size_and_heals_after_each_slice(trained_teacher, tokenizer, texts):
    source = (trained_teacher, tokenizer)
    calls = []
    one_shot = fake_contract([])(source, contraction_ratio=0.5, num_layers_to_contract=2, calibration=None)
    r = iterative_contract(source, steps=2, contraction_ratio=0.5, num_layers_to_contract=2,
                           calibration=texts["train"], heal_tokens=8 * 256, eval_text=texts["eval"],
                           contract_fn=fake_contract(calls), progress=False, **HEAL)
    assert [w for _, w in calls] == [[96, 96, 96], [72, 72, 96]]
    assert r.num_params == models.num_params(one_shot.model) < r.source_params
    assert [s["slice"] for s in r.steps] == [1, 2] and sum(s["tokens"] for s in r.steps) == 8 * 256
    assert all(s["ppl_healed"] <= s["ppl_contracted"] for s in r.steps)
    s = r.summary  # the same size keys as one-shot contraction's summary
    assert (s["params_before"], s["params_after"]) == (r.source_params, r.num_params)
    assert s["reduction_pct"] == pytest.approx(100 * (1 - r.num_params / r.source_params)) and s["reduction_pct"] > 0
    assert [s["layers"] for s in r.steps] == [[0, 1], [0, 1]]  # slice 2 was told slice 1's blocks


def test_split_budget_shares_the_tokens_by_weight_and_refuses_bad_splits():
    assert split_budget(1000, 2) == [500, 500]
    assert split_budget(1000, 3, [1, 1, 2]) == [250, 250, 500]
    assert split_budget(1001, 2, [1, 3]) == [250, 751]  # the rounding leftover goes to the last slice
    assert split_budget(1000, 2, [0, 1]) == [0, 1000]
    for bad in ([1], [1, 2, 3], [1, -1], [1, 0], ["a", 1], [True, 1]):
        with pytest.raises(InvalidSetting, match="heal_split"):
            split_budget(1000, 2, bad)


def test_a_zero_weight_slice_is_not_healed_and_the_last_gets_its_tokens(trained_teacher, tokenizer, texts):
    calls = []
    r = iterative_contract((trained_teacher, tokenizer), steps=2, contraction_ratio=0.5, num_layers_to_contract=2,
                           calibration=texts["train"], heal_tokens=4 * 256, eval_text=texts["eval"],
                           contract_fn=fake_contract(calls), progress=False, heal_split=[0, 1], **HEAL)
    assert [s["tokens"] for s in r.steps] == [0, 4 * 256]
    assert r.steps[0]["stopped"] == "no heal" and r.steps[0]["ppl_healed"] is None
    assert r.steps[1]["ppl_healed"] <= r.steps[1]["ppl_contracted"]
    assert [w for _, w in calls] == [[96, 96, 96], [72, 72, 96]]  # slice 2 narrowed the unhealed slice-1 model
    with pytest.raises(InvalidSetting, match="heal_split"):
        iterative_contract((trained_teacher, tokenizer), steps=2, calibration=texts["train"], heal_tokens=512,
                           contract_fn=fake_contract([]), heal_split=[1, 0])


def test_without_layer_pinning_a_drifting_choice_is_reported(trained_teacher, tokenizer, texts):
    calls = []

    def drifting(source, *, contraction_ratio, num_layers_to_contract, calibration):  # no layers= argument
        return fake_contract(calls)(source, contraction_ratio=contraction_ratio,
                                    num_layers_to_contract=num_layers_to_contract, calibration=calibration)

    with pytest.warns(RuntimeWarning, match="final size differs"):
        r = iterative_contract((trained_teacher, tokenizer), steps=2, contraction_ratio=0.5, num_layers_to_contract=2,
                               calibration=texts["train"], heal_tokens=2 * 256, eval_text=texts["eval"],
                               contract_fn=drifting, progress=False, **HEAL)
    assert [s["layers"] for s in r.steps] == [[0, 1], [0, 2]]


def test_schedule_needs_text_and_a_budget(trained_teacher, tokenizer):
    with pytest.raises(InvalidSetting, match="text"):
        iterative_contract((trained_teacher, tokenizer), steps=2, heal_tokens=1000, contract_fn=fake_contract([]))
    with pytest.raises(InvalidSetting, match="heal_tokens"):
        iterative_contract((trained_teacher, tokenizer), steps=2, heal_tokens=0, calibration="w1 w2\n",
                           contract_fn=fake_contract([]))


def test_with_pyshrink_contract_every_slice_narrows_the_same_blocks(trained_teacher, tokenizer, texts):
    from pyshrink.contract import contract

    source = (trained_teacher, tokenizer)
    kw = dict(contraction_ratio=0.5, num_layers_to_contract=2, calibration=texts["train"])
    settings = dict(seq_len=SEQ, calibration_tokens=1024, eval_tokens=256)
    one_shot = contract(source, **kw, **settings, progress=False)
    r = iterative_contract(source, steps=2, heal_tokens=4 * 256, eval_text=texts["eval"], progress=False,
                           contract_kwargs=settings, **kw, **HEAL)
    first = r.steps[0]["layers"]
    assert r.steps[1]["layers"] == first and len(first) == 2
    assert r.num_params == models.num_params(one_shot.model)


def test_block_groups_share_the_blocks_out_deepest_first():
    assert block_groups([1, 2, 3, 4, 5, 11, 12], 3) == [[5, 11, 12], [3, 4], [1, 2]]
    assert block_groups([0, 2], 2) == [[2], [0]]
    assert sorted(sum(block_groups(list(range(24)), 4), [])) == list(range(24))
    assert block_groups([1, 2, 3, 4, 5, 11, 12], 3, deepest_first=False) == [[1, 2, 3], [4, 5], [11, 12]]


@pytest.mark.parametrize("slices,widths,layers", [
    ("blocks", [96, 48, 48], [[1, 2], [0]]),  # deepest group first
    ("blocks-shallow-first", [48, 48, 96], [[0, 1], [2]]),
])
def test_block_slices_cut_each_block_once_by_the_whole_ratio(trained_teacher, tokenizer, texts, slices, widths, layers):
    """slices='blocks...': slice k narrows only its group, by the whole ratio; the final size is one-shot's of the
    same blocks, and the blocks cut first stay at their final width through the later slices."""
    source = (trained_teacher, tokenizer)
    calls = []
    one_shot = fake_contract([])(source, contraction_ratio=0.5, num_layers_to_contract=3, calibration=None)
    r = iterative_contract(source, steps=2, contraction_ratio=0.5, num_layers_to_contract=3,
                           calibration=texts["train"], heal_tokens=8 * 256, eval_text=texts["eval"],
                           contract_fn=fake_contract(calls), progress=False, slices=slices, **HEAL)
    # the first call only chooses the blocks (one-shot's choice on the source); then one group per slice
    assert [w for _, w in calls] == [[96, 96, 96], [96, 96, 96], widths]
    assert [ratio for ratio, _ in calls] == [0.5, 0.5, 0.5]
    assert [s["layers"] for s in r.steps] == layers
    assert r.num_params == models.num_params(one_shot.model)
    assert sum(s["tokens"] for s in r.steps) == 8 * 256
    assert r.summary["slices"] == slices


def test_block_slices_are_checked(trained_teacher, tokenizer, texts):
    source = (trained_teacher, tokenizer)
    kw = dict(calibration=texts["train"], heal_tokens=1000, contract_fn=fake_contract([]))
    with pytest.raises(InvalidSetting, match="slices must be one of"):
        iterative_contract(source, steps=2, slices="rows", **kw)
    with pytest.raises(InvalidSetting, match="at least one block"):
        iterative_contract(source, steps=3, slices="blocks", layers=[0, 1], **kw)
    with pytest.raises(InvalidSetting, match="fade"):
        iterative_contract(source, steps=2, slices="blocks", heal_schedule="fade", **kw)
    with pytest.raises(InvalidSetting, match="num_layers_to_contract is 2"):
        iterative_contract(source, steps=3, slices="blocks", num_layers_to_contract=2, **kw)
    with pytest.raises(InvalidSetting, match="one-shot"):
        iterative_contract(source, steps=1, slices="blocks", **kw)
    with pytest.raises(InvalidSetting, match="more than once"):
        iterative_contract(source, steps=2, slices="blocks", layers=[0, 0], **kw)


def test_an_output_over_the_source_folder_is_refused_before_any_work(trained_teacher, tokenizer, texts, tmp_path):
    src = models.save(trained_teacher, tokenizer, tmp_path / "runs" / "base")
    before = models.fingerprint(src)
    calls = []
    for out in (src, src.parent):
        with pytest.raises(InvalidSetting, match="overlaps the source"):
            iterative_contract(str(src), steps=2, heal_tokens=1024, calibration=texts["train"], out=out,
                               overwrite=True, contract_fn=fake_contract(calls), progress=False, **HEAL)
    assert calls == [] and models.fingerprint(src) == before


@pytest.mark.parametrize("schedule", ["per-slice", "continuous", "fade"])
def test_an_encoder_is_refused_before_the_first_slice_is_contracted(tokenizer, texts, schedule):
    """The refusal came from the first heal, after the first slice's contraction had run."""
    from tiny import tiny_model

    calls = []
    with pytest.raises(InvalidSetting, match="needs a decoder; bert is an encoder"):
        iterative_contract((tiny_model("bert"), tokenizer), steps=2, calibration=texts["train"], heal_tokens=512,
                           contract_fn=fake_contract(calls), heal_schedule=schedule, **HEAL)
    assert calls == []
