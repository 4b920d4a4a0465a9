"""Adapter.fuse: q|k|v and gate|up as one projection each compute the same logits, share the weights' memory,
and leave the state dict (so save/load) as it was."""
import pytest
import torch

import pyshrink
from pyshrink.arch import adapter_for
from pyshrink.quantize import QuantLinear
from tiny import random_ids, tiny_model


@pytest.mark.parametrize("bits", [None, 4])
def test_fused_llama_blocks_give_the_same_logits(bits):
    model = tiny_model("llama")
    if bits:
        pyshrink.quantize(model, bits=bits, group_size=32, progress=False)
    ids = random_ids(2, 12)
    keys = sorted(model.state_dict())
    with torch.inference_mode():
        before = model(ids).logits
    adapter = adapter_for(model)
    assert sum(adapter.fuse(b) for b in adapter.blocks(model)) == 2 * 3
    assert sum(adapter.fuse(b) for b in adapter.blocks(model)) == 0  # already fused
    with torch.inference_mode():
        after = model(ids).logits
    # same rows of the same weights: float reorders no sums; 4-bit runs the same kernel per output row
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert sorted(model.state_dict()) == keys
    blk = adapter.blocks(model)[0]
    fused = blk.self_attn.__dict__["_pyshrink_qkv"]
    w = "packed" if bits else "weight"
    nq = blk.self_attn.q_proj.out_features
    assert getattr(blk.self_attn.k_proj, w).data_ptr() == getattr(fused, w)[nq:].data_ptr()
    assert isinstance(blk.mlp.__dict__["_pyshrink_gate_up"], QuantLinear if bits else torch.nn.Linear)


def test_a_fused_model_saves_and_loads_unfused(tmp_path):
    model = tiny_model("llama")
    pyshrink.quantize(model, bits=4, group_size=32, progress=False)
    adapter = adapter_for(model)
    for b in adapter.blocks(model):
        adapter.fuse(b)
    ids = random_ids(1, 9)
    with torch.inference_mode():
        ref = model(ids).logits
    pyshrink.save(model, None, tmp_path / "m")
    loaded = pyshrink.load_model(tmp_path / "m", with_tokenizer=False)
    assert "_pyshrink_qkv" not in adapter.blocks(loaded)[0].self_attn.__dict__
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=1e-5)


def test_families_without_fused_forwards_say_so():
    assert adapter_for(tiny_model("gpt2")).fuse is None
