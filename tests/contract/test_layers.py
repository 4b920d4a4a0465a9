"""``contract(..., layers=[...])``: exactly the named blocks are contracted, whatever the measurement prefers."""
import pytest

import pyshrink
from pyshrink.arch import adapter_for
from pyshrink.errors import InvalidSetting

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 80


def _contract(src, **kw):
    return pyshrink.contract(src, calibration=TEXT, seq_len=32, calibration_tokens=256, eval_tokens=64,
                             progress=False, **kw)


def widths(model):
    ad = adapter_for(model)
    return [ad.mlp_width(b) for b in ad.blocks(model)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_given_blocks_are_the_contracted_ones(tiny_folder, family):
    src = tiny_folder(family)
    measured = _contract(src, num_layers_to_contract=1)
    best = measured.summary["layers"][0]["layer"]
    others = [i for i in range(3) if i != best]
    r = _contract(src, layers=list(reversed(others)), num_layers_to_contract=1)  # the count is ignored
    full = widths(measured.model)[others[0]]  # a block the measured run left whole
    expected = [full - round(0.5 * full) if i in others else full for i in range(3)]
    assert widths(r.model) == expected
    assert [row["layer"] for row in r.summary["layers"]] == others  # block order
    assert r.summary["layers_chosen"] == "given" and measured.summary["layers_chosen"] == "measured"
    assert r.summary["settings"]["layers"] == list(reversed(others))
    assert r.summary["settings"]["num_layers_to_contract"] == 2


def test_given_blocks_with_heads(tiny_folder):
    r = _contract(tiny_folder("llama"), layers=[1], prune_heads=True)
    (row,) = r.summary["layers"]
    assert row["layer"] == 1 and row["heads_after"] < row["heads_before"]
    assert widths(r.model)[0] == widths(r.model)[2] == 128 > widths(r.model)[1]


@pytest.mark.parametrize("layers, message", [
    ([], "at least one block"),
    ([0, 0], "must not repeat"),
    ([3], r"0\.\.2 \(the model has 3 blocks\)"),
    ([-1], "integers >= 0"),
    ([1.0], "integers >= 0"),
    ([True], "integers >= 0"),
    ("1,2", "list of block indices"),
    (2, "list of block indices"),
])
def test_bad_layers(tiny_folder, tmp_path, layers, message):
    with pytest.raises(InvalidSetting, match=message):
        _contract(tiny_folder("llama"), layers=layers, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
