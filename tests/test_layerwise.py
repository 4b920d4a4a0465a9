import pytest
import torch

from pyshrink.arch import adapter_for
from pyshrink.layerwise import capture_block_inputs, for_each_block
from tiny import FAMILIES, random_ids, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_replayed_from_cached_inputs_match_the_full_model(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = [random_ids(2, 12, seed=s) for s in range(2)]
    outs = for_each_block(model, adapter, batches, lambda i, blk, inp: inp.run(blk), progress=False)
    for b, ids in enumerate(batches):
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for i in range(adapter.depth(model) - 1):  # the last entry may be after the final norm
            torch.testing.assert_close(outs[i][b], hs[i + 1], rtol=1e-5, atol=1e-5)


def test_capture_records_one_entry_per_batch():
    model = tiny_model("llama")
    cache = capture_block_inputs(model, adapter_for(model), [random_ids(1, 8), random_ids(3, 8)])
    assert [h.shape for h in cache.hidden] == [torch.Size([1, 8, 64]), torch.Size([3, 8, 64])]
    assert cache.num_tokens == 32


@pytest.mark.parametrize("propagate", ["rewritten", "original"])
def test_propagation_modes(propagate):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    ids = random_ids(1, 8)
    seen = []

    def zero_block_0_mlp(i, block, inputs):
        seen.append(inputs.hidden[0].clone())
        if i == 0:
            adapter.mlp_out_module(block).weight.data.zero_()

    for_each_block(model, adapter, [ids], zero_block_0_mlp, propagate=propagate, progress=False)
    changed_model_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    if propagate == "rewritten":
        torch.testing.assert_close(seen[1], changed_model_hidden)
    else:
        assert not torch.allclose(seen[1], changed_model_hidden)


def test_bad_propagate_rejected():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="propagate"):
        for_each_block(model, adapter_for(model), [random_ids()], lambda *a: None, propagate="sideways")
