"""The native kernels are the ones registered and the ones that run; a missing build fails loudly."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pyshrink
from pyshrink import _C
from pyshrink.ops import q4

from _opsutil import q4_exact_bound, q4_fast_bound

OPS = {
    "act_stats_": "act_stats.cpp",
    "quantize_q4": "q4.cpp",
    "dequantize_q4": "q4.cpp",
    "linear_q4": "linear_q4.cpp",
    "quantize_q8": "q8.cpp",
    "linear_q8": "q8.cpp",
}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _run(code, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYSHRINK_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


@pytest.mark.parametrize("op,source", OPS.items())
def test_cpu_kernel_is_the_native_one(op, source):
    dump = torch._C._dispatch_dump(f"pyshrink::{op}")
    cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
    assert len(cpu) == 1, dump
    assert f"csrc/cpu/{source}" in cpu[0].replace(os.sep, "/"), dump
    assert pyshrink.ops.NATIVE


def test_cpu_isa_and_build_info():
    flags = _cpu_flags()
    info = _C.build_info()
    assert info["cuda"] in (True, False) and info["openmp_threads"] >= 1
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    assert info["cpu_supports_avx2"] == avx2 and info["cpu_supports_avx512"] == avx512
    assert _C.cpu_isa() == ("avx512" if avx512 else "avx2" if avx2 else "scalar")
    assert info["cpu_isa"] == _C.cpu_isa()


def test_isa_env_var(monkeypatch):
    monkeypatch.setenv("PYSHRINK_CPU_ISA", "scalar")
    assert _C.cpu_isa() == "scalar"
    monkeypatch.setenv("PYSHRINK_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"pyshrink.linear_q8: PYSHRINK_CPU_ISA must be 'auto', 'avx512', 'avx2' or 'scalar', got 'sse9'"):
        torch.ops.pyshrink.linear_q8(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8), torch.ones(2), None)
    monkeypatch.setenv("PYSHRINK_CPU_ISA", "auto")
    supports = _C.build_info()  # read at a level every CPU has: build_info() itself asks for the chosen level
    for level in ("avx512", "avx2"):
        monkeypatch.setenv("PYSHRINK_CPU_ISA", level)
        if supports[f"cpu_supports_{level}"]:
            assert _C.cpu_isa() == level
        else:  # forcing a level the CPU lacks is an error, not a silent fallback
            with pytest.raises(RuntimeError, match=rf"pyshrink._C.cpu_isa: PYSHRINK_CPU_ISA={level} but this CPU"):
                _C.cpu_isa()


def test_scalar_path_in_a_fresh_process():
    """PYSHRINK_CPU_ISA=scalar set before import: the scalar path runs, quantizes to the same codes as the best
    path, and both paths' products stay within the stated error bounds of the float64 reference (they round
    differently, so they are compared with the reference, not bit for bit with each other)."""
    code = """
        import torch, pyshrink
        from pyshrink import _C
        print(_C.cpu_isa())
        torch.manual_seed(0)
        w = torch.randn(33, 576); x = torch.randn(3, 576)
        p, s, z = pyshrink.ops.quantize_q4(w, 64, False)
        torch.save((p, s, z, pyshrink.ops.linear_q4(x, p, s, z, fast=True), pyshrink.ops.linear_q4(x, p, s, z), x),
                   "{out}")
    """
    outs = {}
    for isa in ("scalar", "auto"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyshrink_isa_{os.getpid()}_{isa}.pt")
        r = _run(code.format(out=path), PYSHRINK_CPU_ISA=isa)
        assert r.returncode == 0, r.stderr
        outs[isa] = (r.stdout.split()[-1], torch.load(path))
        os.remove(path)
    assert outs["scalar"][0] == "scalar"
    (ps, ss, zs, fs, es, x), (pa, sa, za, fa, ea, xa) = outs["scalar"][1], outs["auto"][1]
    assert torch.equal(x, xa)
    assert torch.equal(ps, pa) and torch.equal(ss, sa) and torch.equal(zs, za)  # identical codes
    for fast, outs_ in ((True, (fs, fa)), (False, (es, ea))):
        ref = q4.linear_q4_reference(x.double(), ps, ss, zs, None, fast)
        bound = (q4_fast_bound if fast else q4_exact_bound)(x, ps, ss, zs, None, torch.float32)
        for y in outs_:
            assert ((y.double() - ref).abs() <= bound).all()


def test_missing_extension_raises_loudly():
    r = _run("""
        import sys
        sys.modules["pyshrink._C"] = None  # makes `from pyshrink import _C` raise ImportError
        try:
            import pyshrink
        except ImportError as e:
            print(type(e).__name__, "::", e)
        else:
            print("imported")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("NativeExtensionMissing ::"), r.stdout
    assert "pyshrink._C failed to import" in r.stdout and "PYSHRINK_REFERENCE=1" in r.stdout


def test_reference_mode_warns_and_registers_references():
    r = _run("""
        import sys, warnings
        sys.modules["pyshrink._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pyshrink
        print([str(w.message)[:60] for w in caught if issubclass(w.category, RuntimeWarning)])
        import torch
        print(pyshrink.ops.NATIVE)
        print([l for l in torch._C._dispatch_dump("pyshrink::linear_q4").splitlines() if l.startswith("CPU:")])
        x = torch.randn(2, 64); p, s, z = pyshrink.ops.quantize_q4(torch.randn(4, 64), 32)
        print(tuple(pyshrink.ops.linear_q4(x, p, s, z).shape))
    """, PYSHRINK_REFERENCE="1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "native extension pyshrink._C is not available" in lines[0]
    assert lines[1] == "False"
    assert "csrc/cpu" not in lines[2] and ".py" in lines[2]
    assert lines[3] == "(2, 4)"


@pytest.mark.parametrize("kernel_threads", [0, 2], ids=["torch-threads", "pool"])
def test_concurrent_callers_and_thread_counts(kernel_threads):
    """csrc/cpu/parallel.h: concurrent calls from several Python threads give the same result on torch's
    threads (each caller its own OpenMP team) and on pyshrink's pool (a count set apart: one call runs on the
    pool, the others serially on their own thread), and so does any torch.get_num_threads()."""
    import threading

    pyshrink.ops.set_num_threads(kernel_threads)

    gen = torch.Generator().manual_seed(3)
    p, s, z = pyshrink.ops.quantize_q4(torch.randn(130, 1000, generator=gen), 64, True)
    xs = [torch.randn(5, 1000, generator=gen) for _ in range(4)]
    expected = [pyshrink.ops.linear_q4(x, p, s, z, fast=True) for x in xs]
    got = [None] * len(xs)

    def call(i):
        for _ in range(20):
            got[i] = pyshrink.ops.linear_q4(xs[i], p, s, z, fast=True)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    n = torch.get_num_threads()
    try:
        for k in (1, 3):
            torch.set_num_threads(k)
            assert torch.equal(pyshrink.ops.linear_q4(xs[0], p, s, z, fast=True), expected[0])
    finally:
        torch.set_num_threads(n)
        pyshrink.ops.set_num_threads(0)
