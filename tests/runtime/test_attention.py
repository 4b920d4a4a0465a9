"""pyshrink.runtime.attention: regrouped one-token GQA attention equals float64 attention over repeated heads,
delegates everything else to transformers' sdpa unchanged, and is what TorchDecoder switches GQA models to."""
import math

import pytest
import torch

from pyshrink.runtime import attention
from pyshrink.runtime.torch_decoder import TorchDecoder
from tiny import random_ids, tiny_model

pytest.importorskip("transformers.masking_utils")


class _Attn(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.eval()


def _reference(q, k, v, mask, scale):
    """float64 attention with each key/value head repeated for its query heads (as repeat_kv orders them)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    return (s.softmax(-1) @ v).transpose(1, 2)  # [b, q_len, heads, d], as the interface returns


@pytest.mark.parametrize("mask_kind", ["bool", "float", "per-head bool", "none"])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 2), (8, 1)])
def test_one_token_step_matches_float64(mask_kind, heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, L, d, filled = 2, 37, 16, 23
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = (torch.randn(b, kv_heads, L, d, generator=g) for _ in range(2))
    keep = torch.zeros(b, 1, 1, L, dtype=torch.bool)
    keep[..., :filled] = True
    keep[0, ..., filled - 5:] = False  # rows of the batch differ; the last row keeps the most
    mask = {"bool": keep, "float": torch.zeros(b, 1, 1, L).masked_fill(~keep, -1e30) + 0.1 * torch.randn(b, 1, 1, L, generator=g),
            "per-head bool": keep.expand(b, heads, 1, L).clone(), "none": None}[mask_kind]
    if mask_kind == "per-head bool":
        mask[:, 0, :, 3] = False  # one head masks one more position
    out, weights = attention.gqa_step_attention(_Attn(heads // kv_heads), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (b, 1, heads, d) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, 0.3), rtol=0, atol=2e-6)


def test_everything_else_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    cases = [(_Attn(3), torch.randn(1, 9, 5, 16, generator=g), 3),   # a prompt: 5 queries
             (_Attn(1), torch.randn(1, 4, 1, 16, generator=g), 4)]   # no grouped heads
    train = _Attn(3).train()
    cases.append((train, torch.randn(1, 9, 1, 16, generator=g), 3))  # training
    for module, q, kv in cases:
        k, v = (torch.randn(1, kv, 5, 16, generator=g) for _ in range(2))
        got = attention.gqa_step_attention(module, q, k, v, None, scaling=0.25)[0]
        want = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0]
        assert torch.equal(got, want)


def test_decoder_switches_gqa_models_and_matches_a_full_forward():
    model = tiny_model("llama")  # 4 query heads on 2 key/value heads
    prompt = random_ids(1, 10)[0].tolist()
    tail = [5, 77, 9, 31]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt + tail])).logits[0, len(prompt) - 1:]
    dec = TorchDecoder(model, 16, compile=False)
    assert dec.gqa_attention and model.config._attn_implementation == attention.NAME
    got = torch.stack([dec.prefill(prompt)] + [dec.step(t) for t in tail])
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)  # the full forward (5 queries) ran transformers' sdpa
    assert TorchDecoder(model, 16, compile=False).gqa_attention  # a second decoder on the switched model
    # models without grouped heads, or on another attention implementation, are left alone
    mha = tiny_model("opt")
    assert not attention.use_for_decoding(mha) and mha.config._attn_implementation == "sdpa"
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert not attention.use_for_decoding(eager) and eager.config._attn_implementation == "eager"


def test_switched_model_saves_and_loads_as_before(tmp_path):
    import subprocess
    import sys

    import pyshrink

    model = tiny_model("llama")
    assert attention.use_for_decoding(model)
    pyshrink.save(model, None, tmp_path / "m")
    # a fresh process, where pyshrink's attention was never registered, loads it as a plain sdpa model
    code = ("import sys, pyshrink; m = pyshrink.load_model(sys.argv[1], with_tokenizer=False); "
            "print(m.config._attn_implementation)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "sdpa"
