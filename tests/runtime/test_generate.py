"""Generation on ONNX Runtime equals PyTorch greedy generation, token for token; sampling is seeded."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_helpers import DECODERS, random_prompt, text, tiny_model, torch_greedy
from pyshrink.runtime import OnnxLM, Sampling, sample

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generation_equals_pytorch(family, tiny_onnx):
    lm = OnnxLM(tiny_onnx(family))
    prompt = random_prompt(6, seed=2)
    got, reason = lm.generate_ids(prompt, 12, stop_at_eos=False)
    assert reason == "length"
    assert got == torch_greedy(tiny_model(family), prompt, 12)


def test_text_round_trip_and_eos_stop(tiny_onnx):
    lm = OnnxLM(tiny_onnx("llama"))
    prompt = random_prompt(5, seed=4)
    assert lm.encode(text(prompt)) == prompt
    c = lm.generate(text(prompt), max_new_tokens=8)
    expected = torch_greedy(tiny_model("llama"), prompt, 8)
    if 0 in expected:  # w0 is end-of-sequence: generation stops before it
        expected = expected[: expected.index(0)]
    assert c.token_ids == expected and c.text == text(expected)


def test_sampling_is_reproducible_and_respects_top_p(tiny_onnx):
    lm = OnnxLM(tiny_onnx("gpt2"))
    prompt = random_prompt(5, seed=5)
    a = lm.generate_ids(prompt, 10, Sampling(1.0, 0.9, seed=3), stop_at_eos=False)[0]
    b = lm.generate_ids(prompt, 10, Sampling(1.0, 0.9, seed=3), stop_at_eos=False)[0]
    assert a == b
    tiny_p = lm.generate_ids(prompt, 10, Sampling(1.0, 1e-6, seed=3), stop_at_eos=False)[0]
    assert tiny_p == lm.generate_ids(prompt, 10, Sampling(0.0), stop_at_eos=False)[0]  # nucleus of one = greedy
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    rng = np.random.default_rng(0)
    draws = {sample(logits, Sampling(1.0, 0.6), rng) for _ in range(200)}
    assert draws == {1, 2}  # the two tokens that make up 60% of the mass
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)


def test_prompt_longer_than_the_model_is_an_error(tiny_onnx):
    lm = OnnxLM(tiny_onnx("llama"))
    with pytest.raises(ValueError, match="maximum length"):
        lm.generate_ids([5] * (lm.max_length + 1), 4)


@pytest.mark.parametrize("prompt,n,match", [
    ([5, 6], -5, "max_new_tokens must be an integer >= 1, got -5"),
    ([5, 6], 2.5, "max_new_tokens must be an integer >= 1, got 2.5"),
    ([5, -1], 3, r"prompt ids must be token ids in 0\.\.127, got -1"),  # ORT would wrap it to the last token
    ([5, 128], 3, r"prompt ids must be token ids in 0\.\.127, got 128"),
])
def test_bad_generation_arguments_are_clear_errors(tiny_onnx, prompt, n, match):
    with pytest.raises(ValueError, match=match):
        OnnxLM(tiny_onnx("llama")).generate_ids(prompt, n)


def test_prompt_ids_may_be_a_list_a_numpy_array_or_a_torch_tensor(tiny_onnx):
    import torch

    lm = OnnxLM(tiny_onnx("llama"))
    want = lm.generate_ids([5, 7, 9], 3)
    assert lm.generate_ids(np.array([5, 7, 9]), 3) == want == lm.generate_ids(torch.tensor([[5, 7, 9]]), 3)
    assert lm.generate_ids(iter([5, 7, 9]), 3) == want
    with pytest.raises(ValueError, match="prompt ids must be integer token ids, got float64 values"):
        lm.generate_ids(np.array([5.0, 7.0]), 3)
    with pytest.raises(ValueError, match="prompt ids must be integer token ids, got bool values"):
        lm.generate_ids([True, 5], 3)
    with pytest.raises(ValueError, match=r"prompt ids must be one prompt, \[n\] or \[1, n\], got shape \(2, 3\)"):
        lm.generate_ids(np.array([[5, 7, 9], [11, 12, 13]]), 3)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyshrink", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_generate_cli(tiny_onnx):
    folder = tiny_onnx("llama")
    prompt = random_prompt(5, seed=4)
    r = _cli("generate", str(folder), text(prompt), "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == OnnxLM(folder).generate(text(prompt), 6).text
    r = _cli("generate", str(folder), "w5", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert r.returncode == 0, r.stderr


def test_generate_cli_errors(tiny_onnx, tmp_path):
    r = _cli("generate", str(tmp_path), "hello")
    assert r.returncode == 2 and "pyshrink: error:" in r.stderr and "pyshrink_onnx.json" in r.stderr
    r = _cli("generate", str(tmp_path / "missing"), "hello")
    assert r.returncode == 2 and f"{tmp_path / 'missing'} does not exist" in r.stderr, r.stderr
    (tmp_path / "pyshrink_onnx.json").write_text("{not json")
    r = _cli("generate", str(tmp_path), "hello")
    assert r.returncode == 2 and "pyshrink_onnx.json is corrupt" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("generate", str(tiny_onnx("llama")), "w5", "--top-p", "1.5")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
    for option, value in (("--threads", "0"), ("--threads", "-3"), ("--seed", "-1")):
        r = _cli("generate", str(tiny_onnx("llama")), "w5", option, value)
        assert r.returncode == 2 and f"{option} must be" in r.stderr and "Traceback" not in r.stderr


def test_top_p_a_hair_below_one_keeps_every_token():
    """Rounding can leave the cumulative mass below a top_p near 1; the nucleus is then the whole vocabulary."""
    from pyshrink.runtime.generate import Sampling, sample

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(49152).astype(np.float32)
    for top_p in (0.99999999999999, 0.999999999999999):
        draws = [sample(logits, Sampling(1.0, top_p, None), np.random.default_rng(i)) for i in range(200)]
        assert all(0 <= d < logits.size for d in draws)


_NO_TORCH = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Block())
from pyshrink.runtime import OnnxLM
print(OnnxLM(sys.argv[1]).generate("w5 w6 w7", 5).text)
assert "torch" not in sys.modules
"""


def test_runtime_needs_no_torch(tiny_onnx):
    folder = tiny_onnx("llama")
    r = subprocess.run([sys.executable, "-c", _NO_TORCH, str(folder)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == OnnxLM(folder).generate("w5 w6 w7", 5).text


def test_onnxruntime_genai_runs_the_export_as_is(tiny_onnx):
    og = pytest.importorskip("onnxruntime_genai")
    folder = tiny_onnx("llama")
    prompt = random_prompt(5, seed=6)
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt], dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    assert out == OnnxLM(folder).generate_ids(prompt, 8, stop_at_eos=False)[0][: len(out)]
    assert len(out) >= 1
