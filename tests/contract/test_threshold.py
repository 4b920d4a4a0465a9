"""Contextual mode: remove exactly the neurons whose mean |activation| on the domain text is below the threshold."""
import pytest
import torch

import pyshrink
from pyshrink.arch import adapter_for
from pyshrink.contract import calibration as calib
from pyshrink.data import builtin_text, tokenize, windows
from pyshrink.models import load_model

TEXT = builtin_text("pydoc")[:8000]


def test_threshold_removes_neurons_below_it(tiny_folder):
    src = tiny_folder("opt")
    model, tok = load_model(src)
    ad = adapter_for(model)
    win = windows(tokenize(tok, TEXT), 64, 1024)
    stats = calib.observe_blocks(model, ad, [win[i:i + 4] for i in range(0, len(win), 4)],
                                 lambda i, b, o: o.mlp.mean_abs, progress=False)
    thr = float(stats[1].median())
    res = pyshrink.contract(src, num_layers_to_contract=3, calibration=TEXT, threshold=thr, seq_len=64,
                            calibration_tokens=1024, eval_tokens=256, progress=False)
    assert res.summary["mode"] == "threshold"
    widths = {r["layer"]: r["width_after"] for r in res.summary["layers"]}
    assert 1 in widths
    for i, w in widths.items():
        below = int((stats[i] < thr).sum())
        assert w == len(stats[i]) - min(below, int(0.9 * len(stats[i])))


def test_tiny_threshold_removes_nothing(tiny_folder):
    # GELU never outputs exactly 0 (ReLU models would lose their dead neurons here, rightly)
    with pytest.warns(UserWarning, match=r"threshold=1e-30: no neuron's mean \|activation\| .* nothing was removed"):
        res = pyshrink.contract(tiny_folder("gpt2"), num_layers_to_contract=2, calibration=TEXT, threshold=1e-30,
                                seq_len=64, calibration_tokens=512, eval_tokens=256, progress=False)
    assert res.summary["layers"] == [] and res.summary["params_after"] == res.summary["params_before"]
