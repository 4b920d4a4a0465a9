"""Adapters: head counts, physical head removal and skeleton resizing keep every family's attention valid."""
import pytest
import torch

from pyshrink.arch import adapter_for

from pyshrink_tiny_models import families, tiny_model


def _forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", families())
def test_head_counts_match_config(family):
    model = tiny_model(family)
    ad = adapter_for(model)
    block = ad.blocks(model)[0]
    n_q, n_kv = ad.head_counts(block, model.config)
    assert n_q == ad.num_heads(model.config)
    assert n_kv == ad.num_kv_heads(model.config)


@pytest.mark.parametrize("family", families())
def test_keep_heads_gives_valid_shapes(family):
    model = tiny_model(family)
    ad = adapter_for(model)
    block = ad.blocks(model)[1]
    n_q, n_kv = ad.head_counts(block, model.config)
    groups = n_q // n_kv
    # keep the first kv head (or the first head for multi-head attention) and all of its query heads
    if n_kv > 1:
        kv_keep = torch.tensor([0]) if groups > 1 else torch.tensor([0, 2])
        q_keep = torch.cat([torch.arange(k * groups, (k + 1) * groups) for k in kv_keep.tolist()])
    ad.keep_heads(block, model.config, q_keep, kv_keep)
    assert ad.head_counts(block, model.config) == (len(q_keep), len(kv_keep))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = _forward(model, ids)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", families())
def test_resize_heads_matches_keep_heads(family):
    a, b = tiny_model(family), tiny_model(family)
    ad = adapter_for(a)
    n_q, n_kv = ad.head_counts(ad.blocks(a)[0], a.config)
    groups = n_q // n_kv
    q_keep = torch.arange(n_q // 2) if groups == 1 else torch.cat([torch.arange(k * groups, k * groups + 1) for k in range(n_kv)])
    kv_keep = q_keep if groups == 1 else torch.arange(n_kv)
    ad.keep_heads(ad.blocks(a)[0], a.config, q_keep, kv_keep)
    ad.resize_heads(ad.blocks(b)[0], b.config, len(q_keep), len(kv_keep))
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    shapes_b = {k: v.shape for k, v in b.state_dict().items()}
    assert shapes_a == shapes_b
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, a.config.vocab_size, (1, 9))
    assert torch.equal(_forward(a, ids), _forward(b, ids))


def test_gqa_heads_inside_groups_keep_groups_equal():
    model = tiny_model("llama")
    ad = adapter_for(model)
    block = ad.blocks(model)[0]
    n_q, n_kv = ad.head_counts(block, model.config)  # 6 query heads, 2 kv heads
    q_keep = torch.tensor([0, 2, 3, 5])  # two per kv group
    ad.keep_heads(block, model.config, q_keep, torch.arange(n_kv))
    assert ad.attention(block).num_key_value_groups == 2
    assert torch.isfinite(_forward(model, torch.randint(0, 100, (1, 7)))).all()
