"""Choosing MatMulNBits accuracy levels per projection from measured effects (pyshrink.export.accuracy)."""
import math

import onnx
import pytest
from onnx import TensorProto, helper

from pyshrink.export.accuracy import choose, levels_of, plans, projection_names, set_levels


def test_choose_takes_the_least_harmful_within_the_budget():
    drift = {"a": 0.03, "b": 0.04, "c": 0.5, "d": 0.001}
    # sqrt(0.001^2 + 0.03^2 + 0.04^2) = 0.05001 > 0.05: b stays at 0 at this budget, not at a larger one
    assert choose(drift, 0.05) == {"a": 4, "b": 0, "c": 0, "d": 4}
    assert choose(drift, 0.051) == {"a": 4, "b": 4, "c": 0, "d": 4}
    assert choose(drift, 0.0) == dict.fromkeys(drift, 0)
    assert choose({"a": math.inf, "b": 0.0}, 1.0) == {"a": 0, "b": 4}


def test_plans_shrink_the_budget_then_end_on_all_zero():
    drift = {"a": 0.01, "b": 0.02, "c": 0.06, "d": 1.0}
    got = list(plans(drift, 0.15))  # budgets 0.075, 0.0375, 0.01875
    assert [lv for _, lv in got] == [{"a": 4, "b": 4, "c": 4, "d": 0}, {"a": 4, "b": 4, "c": 0, "d": 0},
                                     {"a": 4, "b": 0, "c": 0, "d": 0}, dict.fromkeys(drift, 0)]
    assert got[-1][0] == "0" and "3 of 4 at 4" in got[0][0]
    assert [lv for _, lv in plans({"a": 1.0}, 0.15)] == [{"a": 0}]  # nothing fits: straight to all at 0


def _graph(names):
    nodes = [helper.make_node("MatMulNBits", ["x", f"{n}.w", f"{n}.s"], [f"{n}.y"], name=f"{n}/MatMulNBits",
                              domain="com.microsoft", K=32, N=8, bits=4, block_size=32, accuracy_level=4)
             for n in names]
    nodes.append(helper.make_node("Relu", ["x"], ["r"], name="relu"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])], [])
    return helper.make_model(g)


def test_set_levels_rewrites_only_matmulnbits_and_needs_every_projection():
    m = _graph(["layers.0.attn.qkv", "lm_head"])
    assert projection_names(m) == ["layers.0.attn.qkv", "lm_head"]
    set_levels(m, {"layers.0.attn.qkv": 0, "lm_head": 4})
    assert levels_of(onnx.load_from_string(m.SerializeToString())) == {"layers.0.attn.qkv": 0, "lm_head": 4}
    with pytest.raises(KeyError, match="lm_head"):
        set_levels(m, {"layers.0.attn.qkv": 0})
