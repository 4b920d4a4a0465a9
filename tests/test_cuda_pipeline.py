"""The Python stages on CUDA with no change to their code: a quantized model saved, reloaded and run with
``generate()`` and TorchDecoder on the GPU's kernels, calibrated quantization and contraction (activation
statistics on the GPU), and a healing run. Skipped without a CUDA device (bench/gpu_check.sh runs it on one).
"""
import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

from _cudautil import kernel_names  # noqa: E402  (tests/conftest.py puts every test folder on sys.path)
from pyshrink import models  # noqa: E402
from pyshrink.quantize import QuantLinear, quantize_model  # noqa: E402
from pyshrink.quantize.config import QuantConfig  # noqa: E402
from tiny import VOCAB, random_ids, tiny_model  # noqa: E402

SMALL = dict(seq_len=64, min_calib_tokens=256, progress=False)


def _calib(n=2048, seed=1):
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saved_quantized_model_generates_on_cuda(tmp_path, dtype):
    model = tiny_model("llama")
    quantize_model(model, QuantConfig(method="rtn", group_size=32, **SMALL))
    from heal_helpers import word_tokenizer

    models.save(model, word_tokenizer(), tmp_path / "q")
    cpu, _ = models.load_model(tmp_path / "q")
    gpu, _ = models.load_model(tmp_path / "q")
    gpu = gpu.to("cuda", dtype)
    assert any(isinstance(m, QuantLinear) and m.packed.is_cuda for m in gpu.modules())
    ids = random_ids()
    with torch.no_grad():
        ref = cpu(ids).logits  # float32 activations on the CPU kernels
        names = kernel_names(lambda: gpu(ids.cuda()))
        out = gpu(ids.cuda()).logits
    assert any("linear_q4_mma_kernel" in n for n in names), sorted(names)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # the same packed weights: only the 16-bit activations differ (bf16 keeps 8 bits of mantissa)
    assert _rel(out, ref) < (0.01 if dtype == torch.float16 else 0.05)
    gen = gpu.generate(ids[:1, :5].cuda(), max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert gen.is_cuda and gen.shape == (1, 13) and torch.equal(gen[0, :5].cpu(), ids[0, :5])


def test_calibrated_quantization_on_cuda_matches_cpu():
    ids = random_ids()
    ref = tiny_model("llama")
    with torch.no_grad():
        ref_out = ref(ids).logits
    on_cpu = tiny_model("llama")
    quantize_model(on_cpu, QuantConfig(method="awq", group_size=32, **SMALL), calibration=_calib())
    on_gpu = tiny_model("llama").cuda()
    names = kernel_names(lambda: quantize_model(on_gpu, QuantConfig(method="awq", group_size=32, **SMALL),
                                                 calibration=_calib()))
    assert any("act_stats_kernel" in n for n in names), sorted(names)
    with torch.no_grad():
        err_cpu = _rel(on_cpu(ids).logits, ref_out)
        err_gpu = _rel(on_gpu(ids.cuda()).logits, ref_out)
    # the same method on the same data: the searched scales may differ by float rounding, not in quality
    assert err_gpu < 1.25 * err_cpu + 1e-3, (err_gpu, err_cpu)


def test_heal_runs_on_cuda():
    from heal_helpers import contract_mlp, markov_text, word_tokenizer

    import pyshrink

    teacher = tiny_model("llama").cuda()
    student = tiny_model("llama")
    contract_mlp(student, keep=48)
    student = student.cuda()
    tok = word_tokenizer()
    res = pyshrink.heal(student, teacher, markov_text(6000), tokenizer=tok, tokens=4096, seq_len=32, lr=3e-3,
                        eval_text=markov_text(2000, seed=1), eval_tokens=1024, progress=False, plot=False)
    assert next(student.parameters()).is_cuda
    assert res.ppl_best < res.ppl_initial, (res.ppl_initial, res.ppl_best)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_calibrated_contraction_of_a_cuda_model_matches_the_cpu(family):
    import pyshrink
    from pyshrink.data import builtin_text

    from pyshrink_tiny_models import tiny_model as arch_model, tiny_tokenizer

    kw = dict(calibration=builtin_text("pydoc")[:12000], prune_heads=True, seq_len=64, calibration_tokens=1024,
              eval_tokens=256, progress=False)
    tok = tiny_tokenizer()
    on_cpu = pyshrink.contract((arch_model(family), tok), 0.5, 2, **kw).summary
    res = pyshrink.contract((arch_model(family).cuda(), tok), 0.5, 2, **kw)
    assert next(res.model.parameters()).is_cuda
    on_gpu = res.summary
    assert on_gpu["params_after"] == on_cpu["params_after"] < on_gpu["params_before"]
    # the same statistics up to float rounding (a near-tie may still pick another neuron): the same quality
    key = "ppl_final" if family == "llama" else "embedding_cosine"
    assert on_gpu[key] == pytest.approx(on_cpu[key], rel=0.05)


def test_torch_decoder_runs_a_quantized_model_on_cuda():
    from pyshrink.runtime.torch_decoder import TorchDecoder

    model = tiny_model("llama")
    quantize_model(model, QuantConfig(method="rtn", group_size=32, **SMALL))
    ids = random_ids()[0, :6]
    ref = TorchDecoder(model, max_length=16)
    gpu = TorchDecoder(model.to("cuda", torch.float16), max_length=16)
    a, b = ref.prefill(ids), gpu.prefill(ids)
    assert b.is_cuda and _rel(b, a) < 0.01
    for t in (5, 9, 17):
        a, b = ref.step(t), gpu.step(t)
        assert _rel(b, a) < 0.01
