"""TorchDecoder: prefill + steps give the logits of one full forward pass, eager and compiled; clear errors."""
import pytest
import torch

import pyshrink
from pyshrink.errors import InvalidSetting
from pyshrink.runtime.torch_decoder import TorchDecoder
from tiny import random_ids, tiny_model

TAIL = [5, 77, 9, 31]


def _reference(model, prompt):
    with torch.inference_mode():
        return model(torch.tensor([prompt + TAIL])).logits[0, len(prompt) - 1:]  # after each decoded position


def _decode(dec, prompt):
    return torch.stack([dec.prefill(prompt)] + [dec.step(t) for t in TAIL])


@pytest.mark.parametrize("bits", [None, 4])
def test_eager_steps_match_a_full_forward(bits):
    model = tiny_model("llama")
    if bits:
        pyshrink.quantize(model, bits=bits, group_size=32, progress=False)
    prompt = random_ids(1, 10)[0].tolist()
    ref = _reference(model, prompt)
    for fuse in (False, True):
        dec = TorchDecoder(model, 16, compile=False, fuse=fuse)
        assert dec.fused_groups == (6 if fuse else 0)
        torch.testing.assert_close(_decode(dec, prompt), ref, rtol=0, atol=2e-5)
        torch.testing.assert_close(_decode(dec, prompt), ref, rtol=0, atol=2e-5)  # a second sequence: cache reset


def test_compiled_steps_match_eager():
    torch.manual_seed(0)
    model = tiny_model("llama")
    pyshrink.quantize(model, bits=4, group_size=32, progress=False)
    prompt = random_ids(1, 10)[0].tolist()
    ref = _reference(model, prompt)
    dec = TorchDecoder(model, 16)
    got = _decode(dec, prompt)
    # inductor reorders the float arithmetic around the 4-bit op, whose int8 activation rounding can then flip:
    # a bound well below the logits' spread, not bitwise equality
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with prof:
        dec.step(3)
    names = {e.name for e in prof.events()}
    assert "pyshrink::linear_q4" in names  # the native op runs inside the compiled graph
    assert "Torch-Compiled Region: 0/0" in names or any("Compiled" in n for n in names)


def test_errors():
    model = tiny_model("llama")
    dec = TorchDecoder(model, 8, compile=False)
    with pytest.raises(InvalidSetting, match="prefill"):
        dec.step(1)
    with pytest.raises(InvalidSetting, match="1..7"):
        dec.prefill(list(range(8)))
    dec.prefill([1, 2, 3, 4, 5, 6, 7])
    dec.step(1)
    with pytest.raises(InvalidSetting, match="full"):
        dec.step(1)
    with pytest.raises(InvalidSetting, match="fuse"):
        TorchDecoder(tiny_model("gpt2"), 8, compile=False)
    with pytest.raises(InvalidSetting, match="encoder"):
        TorchDecoder(tiny_model("bert"), 8, compile=False)
    with pytest.raises(InvalidSetting, match="max_length"):
        TorchDecoder(model, 1)


def test_step_threads_split_and_restored(monkeypatch):
    """A quantized model's prompt and steps run torch on one thread and the kernels on ``threads``; both are
    restored after, and a float model keeps torch's own count."""
    from pyshrink.ops import get_num_threads

    model = tiny_model("llama")
    assert TorchDecoder(model, 16, compile=False).torch_threads == torch.get_num_threads()
    pyshrink.quantize(model, bits=4, group_size=32, progress=False)
    dec = TorchDecoder(model, 16, compile=False, threads=2)
    assert (dec.threads, dec.torch_threads) == (2, 1)
    seen = []
    for name in ("_forward", "_compiled"):  # the prompt's forward, the step's
        monkeypatch.setattr(dec, name, lambda *a, f=getattr(dec, name), n=name: (
            seen.append((n, get_num_threads(), torch.get_num_threads())), f(*a))[1])
    before = (get_num_threads(), torch.get_num_threads())
    dec.prefill(random_ids(1, 5)[0].tolist())
    assert seen == [("_forward", 2, 1)] and (get_num_threads(), torch.get_num_threads()) == before
    dec.step(3)
    assert seen[1:] == [("_compiled", 2, 1)] and (get_num_threads(), torch.get_num_threads()) == before
    with pytest.raises(InvalidSetting, match="torch_threads must be"):
        TorchDecoder(model, 16, compile=False, torch_threads=0)


def test_sliding_window_model_compiles_and_keeps_its_window():
    """Mistral's sliding-window layers: transformers' sliding static cache made the compiled step recompile every
    token until torch.compile's limit (8) failed it; the full-length cache decodes past the window, as one forward."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=4, **cfg)).eval()
    ids = random_ids(1, 18)[0].tolist()  # a 6-token prompt, then 12 steps, past the 4-token window
    with torch.inference_mode():
        ref = model(torch.tensor([ids])).logits[0, 5:]
        full = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, **cfg))
        full.load_state_dict(model.state_dict())
        assert (full.eval()(torch.tensor([ids])).logits[0, 5:] - ref).abs().max() > 1e-3  # the window matters
    dec = TorchDecoder(model, 24, fuse=False)
    for _ in range(2):  # a second sequence: cache reset
        got = torch.stack([dec.prefill(ids[:6])] + [dec.step(t) for t in ids[6:]])
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_compiled_opt_steps_match_a_full_forward():
    """transformers' OPT derived its positions from how much of the static cache was filled, a data-dependent
    shape: the first compiled step failed ("Could not guard on data-dependent expression"). The decoder now
    passes OPT the positions and a mask of the cache's length."""
    model = tiny_model("opt")
    prompt = random_ids(1, 10)[0].tolist()
    ref = _reference(model, prompt)
    dec = TorchDecoder(model, 16, fuse=False)
    torch.testing.assert_close(_decode(dec, prompt), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(_decode(dec, prompt), ref, rtol=0, atol=2e-5)
