"""pyshrink.kv_cache: a KV cache handed to a model and read back token by token gives the full forward's logits,
under the argument names this transformers uses (no deprecation warning on the way)."""
import warnings

import pytest
import torch

from pyshrink.arch import adapter_for
from pyshrink.kv_cache import cache_inputs, returned_cache
from tiny import FAMILIES, random_ids, tiny_model

DECODERS = [f for f in FAMILIES if f != "bert"]


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("family", DECODERS)
def test_token_by_token_with_the_returned_cache_matches_the_full_forward(family, fuse):
    model = tiny_model(family)
    if fuse:
        fuse_block = adapter_for(model).fuse
        if fuse_block is None:
            pytest.skip(f"{family} has no fused projections")
        assert sum(fuse_block(b) for b in adapter_for(model).blocks(model)) > 0
    ids = random_ids(1, 12)
    with torch.no_grad():
        full = model(ids).logits[0].double()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # the cache under a deprecated name warns
            out = model(ids[:, :5], use_cache=True)
            steps = [out.logits[0]]
            for t in range(5, ids.shape[1]):
                out = model(ids[:, t:t + 1], use_cache=True, **cache_inputs(model, returned_cache(out)))
                steps.append(out.logits[0])
    stepped = torch.cat(steps).double()
    assert stepped.shape == full.shape
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-4)
