"""The projections that planning reads: the module's own weights, not float64 copies of them."""
import pytest
import torch

from pyshrink.arch import adapter_for
from pyshrink.contract import heads, neurons
from pyshrink.contract.calibration import ChannelStats
from pyshrink_tiny_models import tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D (whose [out, in] is a view)
def test_planning_reads_the_projections_without_copying_them(family):
    model = tiny_model(family).to(torch.bfloat16)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    down, o = adapter.mlp_out_module(block), adapter.attn_out_module(block)
    layers = [(neurons.down_layer(adapter, block, ChannelStats(adapter.mlp_width(block))), down),
              (heads._o_layer(adapter, block, ChannelStats(model.config.hidden_size), 4), o)]
    for layer, m in layers:
        assert layer.weight.dtype == torch.bfloat16
        assert layer.weight.untyped_storage().data_ptr() == m.weight.untyped_storage().data_ptr()
        assert layer.weight.shape == (m.weight.shape[::-1] if family == "gpt2" else m.weight.shape)
