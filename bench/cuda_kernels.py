"""Benchmark pyshrink's CUDA kernels: linear_q4 against cuBLAS fp16 and ONNX Runtime's MatMulNBits, and
act_stats_ against the HBM bandwidth. Prints Markdown tables and the targets, PASS or FAIL.

    python bench/cuda_kernels.py [--group-size 64] [--asym] [--trials 15]

Method: every timed call reads weights that are not in L2 (as many copies of the weights as it takes to
exceed twice the L2 size, used round-robin), x and the output stay the same. A trial enqueues a run of
calls behind ``torch.cuda._sleep`` (so the CPU's launch overhead is hidden and the GPU runs the calls back
to back) between two CUDA events; the reported time is the median over trials of (event time / calls).
Achieved bandwidth counts the bytes a call must move: weights (packed + scales + zero points) or fp16
weights, plus x and y. HBM peak comes from the device (memory clock x bus width x 2); the measured
device-to-device copy bandwidth is printed beside it as the practical ceiling.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

ENV_MIN_M = "PYSHRINK_Q4_DEQUANT_MATMUL_MIN_M"
SHAPES = [(8192, 8192), (4096, 11008)]  # (K, N)
MS = [1, 16, 1024]


# ------------------------------------------------------------------------------------------------------
# device facts


def hbm_peak_gbs(dev: int) -> tuple[float | None, str]:
    """Theoretical DRAM bandwidth in GB/s and where the number came from."""
    props = torch.cuda.get_device_properties(dev)
    clock = getattr(props, "memory_clock_rate", None)  # kHz, newer PyTorch
    width = getattr(props, "memory_bus_width", None)   # bits
    src = "torch device properties"
    if not clock or not width:
        try:
            import cupy

            p = cupy.cuda.runtime.getDeviceProperties(dev)
            clock, width, src = p["memoryClockRate"], p["memoryBusWidth"], "cupy device properties"
        except Exception:  # noqa: BLE001  (cupy missing or no driver: fall back to the table)
            clock = width = None
    if clock and width:
        return 2.0 * clock * 1e3 * width / 8 / 1e9, src
    table = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0,
             "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0, "L4": 300.0,
             "A10": 600.0, "L40S": 864.0}
    for key, v in table.items():
        if key in props.name:
            return v, "datasheet table"
    return None, "unknown"


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e9


# ------------------------------------------------------------------------------------------------------
# timing


def time_calls(fns, trials: int, calls: int | None = None) -> float:
    """Median seconds per call; fns are rotated through (each reads different weights)."""
    calls = calls or max(len(fns), 20)
    for _ in range(3):
        for f in fns:
            f()
    torch.cuda.synchronize()
    # how long the CPU needs to enqueue one run, so that the sleep in front of it covers it
    t0 = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    enqueue_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    clock_hz = 1.5e9  # conservative: a longer sleep only costs wall time
    sleep_cycles = int(min(2.0 * enqueue_s * clock_hz + 1e5, 2e9))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(trials):
        torch.cuda._sleep(sleep_cycles)
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(per_call)


def copies_needed(bytes_per_copy: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
    return max(2, math.ceil(2 * l2 / max(bytes_per_copy, 1)) + 1)


# ------------------------------------------------------------------------------------------------------
# ONNX Runtime MatMulNBits on the same packed weights


def matmulnbits_model(packed, scales, zero_points, K: int, N: int, g: int, float16: bool = True):
    """A one-node com.microsoft::MatMulNBits model holding pyshrink's packed weights byte for byte."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    np_dtype = np.float16 if float16 else np.float32
    inits = [
        numpy_helper.from_array(packed.cpu().numpy(), "B"),
        numpy_helper.from_array(scales.cpu().numpy().astype(np_dtype).reshape(-1), "scales"),
    ]
    inputs = ["A", "B", "scales"]
    if zero_points.numel():
        inits.append(numpy_helper.from_array(zero_points.cpu().numpy().reshape(-1), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=g,
                            accuracy_level=0)
    graph = helper.make_graph([node], "pyshrink_q4", [helper.make_tensor_value_info("A", elem, ["M", K])],
                              [helper.make_tensor_value_info("Y", elem, ["M", N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def ort_cuda_status() -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu); "
                       "ORT CUDA columns skipped")
    return True, f"onnxruntime {ort.__version__} CUDAExecutionProvider"


def ort_runner(model, x, y):
    """A zero-argument callable that runs the model on x into y on the current torch stream."""
    import numpy as np
    import onnxruntime as ort

    dev = x.device.index or 0
    stream = torch.cuda.current_stream().cuda_stream
    opts = {"device_id": str(dev), "user_compute_stream": str(stream)}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[("CUDAExecutionProvider", opts)])
    if "CUDAExecutionProvider" not in sess.get_providers():
        raise RuntimeError("ORT fell back to the CPU provider")
    io = sess.io_binding()
    io.bind_input("A", "cuda", dev, np.float16, list(x.shape), x.data_ptr())
    io.bind_output("Y", "cuda", dev, np.float16, list(y.shape), y.data_ptr())
    ro = ort.RunOptions()
    ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return lambda: sess.run_with_iobinding(io, ro)


# ------------------------------------------------------------------------------------------------------
# benchmarks


def q4_bytes(packed, scales, zp) -> int:
    return packed.numel() + scales.numel() * 4 + zp.numel()


def bench_linear(args, peak):
    import pyshrink.ops as ops

    rows, paths, checks = [], [], []
    ort_ok, ort_msg = ort_cuda_status()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for K, N in SHAPES:
        w16 = (torch.randn(N, K, generator=gen, device="cuda") * 0.02).half()
        packed, scales, zp = ops.quantize_q4(w16, args.group_size, not args.asym)
        wq_bytes = q4_bytes(packed, scales, zp)
        n_q4, n_16 = copies_needed(wq_bytes), copies_needed(w16.numel() * 2)
        q4_copies = [(packed.clone(), scales.clone(), zp.clone()) for _ in range(n_q4)]
        w16_copies = [w16.clone() for _ in range(n_16)]
        ort_models = ([matmulnbits_model(packed, scales, zp, K, N, args.group_size)] if ort_ok else [])
        for M in MS:
            x = torch.randn(M, K, generator=gen, device="cuda").half()
            io_bytes = (M * K + M * N) * 2
            t16 = time_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in w16_copies], args.trials)
            os.environ.pop(ENV_MIN_M, None)
            tq = time_calls([lambda c=c: ops.linear_q4(x, *c) for c in q4_copies], args.trials)
            t_ort, ort_note = None, ort_msg
            if ort_ok:
                try:
                    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
                    runners = [ort_runner(ort_models[0], x, y) for _ in range(n_q4)]  # one session = one copy
                    t_ort = time_calls(runners, args.trials)
                except Exception as exc:  # noqa: BLE001  (report, don't abort the benchmark)
                    ort_note = f"ORT CUDA failed: {exc}"
            gbs_q = (wq_bytes + io_bytes) / tq / 1e9
            gbs_16 = (w16.numel() * 2 + io_bytes) / t16 / 1e9
            rows.append((K, N, M, t16, tq, gbs_16, gbs_q, t_ort, ort_note))
            if M >= 16:  # both linear_q4 paths, to place the dequantize + cuBLAS threshold
                os.environ[ENV_MIN_M] = str(1 << 40)
                t_kernel = time_calls([lambda c=c: ops.linear_q4(x, *c) for c in q4_copies], args.trials)
                os.environ[ENV_MIN_M] = "1"
                t_dq = time_calls([lambda c=c: ops.linear_q4(x, *c) for c in q4_copies], args.trials)
                os.environ.pop(ENV_MIN_M, None)
                paths.append((K, N, M, t16, t_kernel, t_dq))
            speed = t16 / tq
            pct = 100 * gbs_q / peak if peak else float("nan")
            if M == 1:
                checks.append((f"linear_q4 M=1 K={K} N={N}: >= 3.5x faster than fp16", speed >= 3.5, f"{speed:.2f}x"))
                checks.append((f"linear_q4 M=1 K={K} N={N}: >= 80% of HBM peak", pct >= 80, f"{pct:.0f}%"))
            elif M == 16:
                checks.append((f"linear_q4 M=16 K={K} N={N}: >= 3x faster than fp16", speed >= 3.0, f"{speed:.2f}x"))
            elif M == 1024:
                checks.append((f"linear_q4 M=1024 K={K} N={N}: no slower than fp16", tq <= t16, f"{speed:.2f}x"))
        del q4_copies, w16_copies
        torch.cuda.empty_cache()
    return rows, paths, checks, ort_msg


def bench_act_stats(args, peak):
    import pyshrink.ops as ops

    rows, checks = [], []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for dtype, (T, C) in ((torch.bfloat16, (32768, 8192)), (torch.float16, (16384, 4096)), (torch.float32, (16384, 8192))):
        x = torch.randn(T, C, generator=gen, device="cuda").to(dtype)
        acc, cnt = ops.new_accumulators(C, device="cuda")
        t = time_calls([lambda: torch.ops.pyshrink.act_stats_(x, acc, cnt)], args.trials, calls=10)
        gbs = x.numel() * x.element_size() / t / 1e9
        pct = 100 * gbs / peak if peak else float("nan")
        rows.append((str(dtype)[6:], T, C, t, gbs, pct))
        checks.append((f"act_stats_ {str(dtype)[6:]} [{T}, {C}]: >= 80% of HBM peak", pct >= 80, f"{pct:.0f}%"))
        del x
    return rows, checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--asym", action="store_true", help="asymmetric weights (zero points)")
    ap.add_argument("--trials", type=int, default=15)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/cuda_kernels.py: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    import pyshrink  # noqa: F401  (registers the kernels)
    from pyshrink import _C

    if not _C.build_info().get("cuda"):
        print("bench/cuda_kernels.py: pyshrink._C was built without CUDA", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    peak, peak_src = hbm_peak_gbs(0)
    copy_bw = copy_bandwidth_gbs()
    print(f"# pyshrink CUDA kernels on {props.name}\n")
    print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}), {props.multi_processor_count} SMs, "
          f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    print(f"- HBM peak: {f'{peak:.0f} GB/s' if peak else 'unknown'} ({peak_src}); measured device copy "
          f"(read + write): {copy_bw:.0f} GB/s")
    print(f"- weights: 4-bit, group size {args.group_size}, {'asymmetric' if args.asym else 'symmetric'}; "
          f"activations fp16; median of {args.trials} trials\n")

    rows, paths, checks, ort_msg = bench_linear(args, peak)
    print("## linear_q4 vs cuBLAS fp16 and ONNX Runtime MatMulNBits\n")
    print(f"ORT: {ort_msg}\n")
    print("| K -> N | M | fp16 cuBLAS us | pyshrink q4 us | q4 speedup | fp16 GB/s | q4 GB/s | q4 % HBM peak "
          "| ORT q4 us | pyshrink vs ORT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for K, N, M, t16, tq, g16, gq, tort, note in rows:
        pct = f"{100 * gq / peak:.0f}%" if peak else "n/a"
        ort_cell = f"{tort * 1e6:.1f}" if tort else "skipped"
        vs = f"{tort / tq:.2f}x" if tort else "n/a"
        print(f"| {K} -> {N} | {M} | {t16 * 1e6:.1f} | {tq * 1e6:.1f} | {t16 / tq:.2f}x | {g16:.0f} | {gq:.0f} | "
              f"{pct} | {ort_cell} | {vs} |")
    failed_ort = {r[8] for r in rows if r[7] is None and r[8] != ort_msg}
    for note in failed_ort:
        print(f"\n{note}")

    print(f"\n## linear_q4 paths (default: tensor-core kernel below M = {ENV_MIN_M} = 512, dequantize + cuBLAS "
          "at and above)\n")
    print("| K -> N | M | fp16 cuBLAS us | mma kernel us | dequant + cuBLAS us | faster path |")
    print("|---|---:|---:|---:|---:|---|")
    for K, N, M, t16, tk, tdq in paths:
        print(f"| {K} -> {N} | {M} | {t16 * 1e6:.1f} | {tk * 1e6:.1f} | {tdq * 1e6:.1f} | "
              f"{'mma kernel' if tk <= tdq else 'dequant + cuBLAS'} |")

    st_rows, st_checks = bench_act_stats(args, peak)
    print("\n## act_stats_\n")
    print("| dtype | tokens | channels | us | GB/s | % HBM peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for dt, T, C, t, gbs, pct in st_rows:
        print(f"| {dt} | {T} | {C} | {t * 1e6:.1f} | {gbs:.0f} | {pct:.0f}% |")

    print("\n## targets\n")
    for name, ok, value in checks + st_checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {name} (measured {value})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
