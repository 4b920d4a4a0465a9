"""CPU kernel benchmark: pyshrink's linear_q4 (exact and fast) against torch and ONNX Runtime, side by side.

    python bench/kernels.py            # full run (a few minutes), Markdown table on stdout
    python bench/kernels.py --quick    # smoke run: one shape, few repeats

Every method multiplies the same activations by the same 4096x4096, 4096->11008 and 11008->4096 weights,
for M in {1, 8, 128}, with 2 threads. Weights are ROTATED: each method cycles over enough copies of its
weights (--rotate-mb, default 512 MB per method) that no cache holds them, so M=1 numbers are memory
bound as in real decoding. Methods are timed in interleaved rounds so that load from other processes hits
all methods alike; by default each round runs a method for a block of consecutive calls (the first of each
block not counted, the first 3 at M=1) after a 60 ms busy wait, because a peer's thread pool keeps spinning after its call and
would steal a core from the next method's call (see settle()); `--schedule round-robin` times one call per
method per round instead.

* pyshrink exact / fast: linear_q4, g=64 symmetric (MatMulNBits layout, float32 scales).
* ORT acc0 / acc4: onnxruntime com.microsoft::MatMulNBits, accuracy_level 0 and 4, built from the SAME
  packed bytes and scales (one tiny ONNX graph per weight copy).
* torch f32 / bf16: torch.nn.functional.linear on dense float32 / bfloat16 weights.
* torch int4: torch.ops.aten._weight_int4pack_mm_for_cpu on the same codes and scales (g=64).

Effective GB/s counts the bytes of weights each method reads (packed codes + scales for the 4-bit ones);
"% of read BW" compares it with this machine's read bandwidth measured beside it: the higher of two probes
timed in each shape's M=1 rounds, interleaved with the methods, "read probe 1 GB" (torch.sum over one 1 GB
buffer) and "read probe" (torch.sum over rotated float32 buffers of the 4-bit weights' size, the methods'
per-call size). The read bandwidth of this VM moves by 10-25 % within minutes (the 1 GB probe at the start of
two runs six minutes apart: 21.3 and 27.7 GB/s), so a probe taken once at the start is printed only for
reference. pyshrink's codes sit in huge-page memory, as a loaded model's do (pyshrink.ops.memory), and so do
both probes' buffers, so the comparison is between reads from the same kind of pages; --no-hugepages keeps
all three in plain allocations.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# this checkout's build, not whichever pyshrink is installed (a worktree would time main's kernels otherwise)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pyshrink  # noqa: E402,F401
from pyshrink import _C  # noqa: E402
from pyshrink.ops import memory, q4  # noqa: E402

G = 64
PROBE = "read probe"  # torch.sum over buffers of the 4-bit weights' size; timed at M=1 only
PROBE_1GB = "read probe 1 GB"  # torch.sum over one 1 GB buffer; timed at M=1 only
PROBES = (PROBE, PROBE_1GB)


def read_bandwidth(gb: float = 1.0, reps: int = 5) -> tuple[float, float]:
    """(2-thread, 1-thread) GB/s of torch.sum over `gb` GB of float32, median of `reps`. On a busy machine
    the 2-thread number suffers from OpenMP's end-of-region barrier, so the better of the two is used."""
    a = torch.ones(int(gb * 2**30) // 4, dtype=torch.float32)
    out = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        a.sum()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            a.sum()
            ts.append(time.perf_counter() - t)
        out.append(gb * 2**30 / statistics.median(ts) / 1e9)
    torch.set_num_threads(2)
    del a
    return out[0], out[1]


def _ort_global_pool(threads: int = 2):
    import onnxruntime.capi._pybind_state as ort_c
    if not getattr(_ort_global_pool, "done", False):  # must precede the first session
        ort_c.set_global_thread_pool_sizes(threads, 1)
        _ort_global_pool.done = True


def ort_session(packed: np.ndarray, scales: np.ndarray, K: int, N: int, acc: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=G, accuracy_level=acc)
    graph = helper.make_graph(
        [node], "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=[numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14
    _ort_global_pool()
    so = ort.SessionOptions()
    # All weight copies share ONE 2-thread pool, as the layers of one real model do: with a pool per session,
    # the previous copy's pool keeps spinning while the next copy's pool runs, and ORT loses half its cores.
    so.use_per_session_threads = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def make_methods(K: int, N: int, rotate_bytes: float, gen: torch.Generator, with_ort: bool, huge: bool):
    """name -> (list of per-copy callables taking x [M, K] float32, bytes of weights read per call).

    With ``huge``, pyshrink's codes sit in huge-page memory as in a loaded model (pyshrink.ops.memory), and so
    do both read probes' buffers, so that '% of read BW' compares reads from the same kind of pages."""
    home = memory.in_hugepages if huge else (lambda t: t)
    nb = -(-K // G)
    q_bytes = N * nb * (G // 2) + N * nb * 4

    def copies(bytes_per_copy):
        return max(2, int(np.ceil(rotate_bytes / bytes_per_copy)))

    base = []
    for _ in range(copies(q_bytes)):
        packed = torch.randint(0, 256, (N, nb, G // 2), dtype=torch.uint8, generator=gen)
        scales = torch.randn(N, nb, generator=gen) * 0.01
        base.append((packed, scales))
    ours = [(home(p), s) for p, s in base]
    zp = torch.empty(0, dtype=torch.uint8)
    methods = {
        "pyshrink exact": ([lambda x, p=p, s=s: torch.ops.pyshrink.linear_q4(x, p, s, zp, None, False) for p, s in ours], q_bytes),
        "pyshrink fast": ([lambda x, p=p, s=s: torch.ops.pyshrink.linear_q4(x, p, s, zp, None, True) for p, s in ours], q_bytes),
    }
    if with_ort:
        for acc in (0, 4):
            sess = [ort_session(p.numpy(), s.numpy(), K, N, acc) for p, s in base]
            methods[f"ORT acc{acc}"] = ([lambda x, s=s: s.run(None, {"A": x.numpy()})[0] for s in sess], q_bytes)
    # torch int4 from the same codes: w = (q - 8) * scale + zero, zero = 0
    i4 = []
    for p, s in base[: copies(N * K // 2 + N * nb * 8)]:
        codes = q4.unpack_codes(p).reshape(N, nb * G)[:, :K].to(torch.int32)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([s.T.contiguous(), torch.zeros(nb, N)], dim=-1)
        i4.append((w4, sz))
    methods["torch int4"] = ([lambda x, w=w, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, G, sz) for w, sz in i4],
                             N * K // 2 + N * nb * 8)
    dense = [q4.dequantize_q4_reference(p, s, zp, K) for p, s in base[: copies(N * K * 4)]]
    while len(dense) < copies(N * K * 4):
        dense.append(dense[-1] + 0)  # more copies than packed ones: clone
    methods["torch f32"] = ([lambda x, w=w: F.linear(x, w) for w in dense], N * K * 4)
    dense16 = [w.bfloat16() for w in dense[: copies(N * K * 2)]]
    while len(dense16) < copies(N * K * 2):
        dense16.append(dense16[-1] + 0)
    methods["torch bf16"] = ([lambda x, w=w: F.linear(x.bfloat16(), w) for w in dense16], N * K * 2)
    # A plain read of the same bytes per call (float32 buffers the size of the 4-bit weights, rotated alike),
    # timed in the same rounds: the read bandwidth a GEMV of this size could reach at this moment.
    flat = [home(torch.ones(q_bytes // 4)) for _ in range(copies(q_bytes))]
    methods[PROBE] = ([lambda x, b=b: b.sum() for b in flat], q_bytes)
    big = home(torch.ones(2**28))  # the start-of-run probe's 1 GB, in the same rounds
    methods[PROBE_1GB] = ([lambda x: big.sum()], 2**30)
    return methods


def settle(seconds: float):
    """Busy-waits. ONNX Runtime's global pool keeps spinning 20-50 ms after a call (development measurement:
    pyshrink exact started 20 ms after ORT calls streamed 10.5 GB/s, 50 ms after 19.7), so peers need that
    long to go quiet; and a sleeping main thread lets the VM idle the vCPU, after which the next short calls
    ran slow (pyshrink fast on 4096x4096 after a 20 ms sleep: 10-12 GB/s; after a 20 ms busy wait: 21)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_round_robin(methods, x, rounds: int, warmup: int = 2, budget_s: float = 4.0, block: int = 1,
                     settle_s: float = 0.0, skip: int = 1):
    """Median wall time per method over interleaved rounds, so that load from other processes hits all methods alike.

    Each round runs every method for ``block`` consecutive calls (each on the next rotated weight copy). With
    ``block > 1`` the first ``skip`` calls of a block are not counted and the round busy-waits ``settle_s`` between methods: thread
    pools (ONNX Runtime's, OpenMP's, pyshrink's) keep spinning for a while after a call, and a peer's spinning
    threads would otherwise steal a core from the next method's first calls. A method whose calls add up to more
    than budget_s (e.g. torch int4 at M=128, seconds per call here) stops early with at least 2 samples."""
    names = list(methods)
    idx = {n: 0 for n in names}
    times = {n: [] for n in names}
    spent = {n: 0.0 for n in names}
    for r in range(warmup + rounds):
        for n in names:
            if spent[n] > budget_s and len(times[n]) >= 2:
                continue
            fns = methods[n][0]
            if settle_s:
                settle(settle_s)
            for b in range(block):
                fn = fns[idx[n] % len(fns)]
                idx[n] += 1
                t = time.perf_counter()
                fn(x)
                dt = time.perf_counter() - t
                spent[n] += dt
                if (r >= warmup or spent[n] > budget_s) and (b >= skip or block == 1):
                    times[n].append(dt)
    return {n: statistics.median(v) for n, v in times.items()}


def bench_act_stats(rounds: int):
    rows = []
    for shape, dtype in [((2048, 4096), torch.float32), ((2048, 4096), torch.bfloat16), ((16384, 576), torch.float32)]:
        xs = [torch.randn(*shape).to(dtype) for _ in range(max(2, int(np.ceil(256e6 / (shape[0] * shape[1] * dtype.itemsize)))))]
        C = shape[-1]
        acc, cnt = pyshrink.ops.new_accumulators(C)

        def ours(x):
            torch.ops.pyshrink.act_stats_(x, acc, cnt)

        def torch64(x):  # what the reference computes: float64 sums
            x2 = x.reshape(-1, C).double()
            return torch.stack([x2.abs().sum(0), x2.sum(0), (x2 * x2).sum(0)])

        def torch32(x):  # cheapest PyTorch one-liner: float32 sums (less precise than the op promises)
            x2 = x.reshape(-1, C).float()
            return torch.stack([x2.abs().sum(0), x2.sum(0), (x2 * x2).sum(0)])

        methods = {"pyshrink act_stats_": ([lambda _, x=x: ours(x) for x in xs], 0),
                   "torch float64 expr": ([lambda _, x=x: torch64(x) for x in xs], 0),
                   "torch float32 expr": ([lambda _, x=x: torch32(x) for x in xs], 0)}
        t = time_round_robin(methods, None, rounds)
        nbytes = shape[0] * shape[1] * dtype.itemsize
        for n, v in t.items():
            rows.append((f"{shape[0]}x{shape[1]} {str(dtype)[6:]}", n, v * 1e3, t["torch float64 expr"] / v,
                         t["torch float32 expr"] / v, nbytes / v / 1e9))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, few repeats, small rotation")
    ap.add_argument("--rotate-mb", type=float, default=None, help="weight bytes cycled per method (default 512, quick 96)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--no-hugepages", action="store_true",
                    help="keep pyshrink's codes and the read probes in plain allocations (4 KiB pages where THP is "
                         "'madvise'), as before pyshrink moved loaded codes into huge pages")
    ap.add_argument("--schedule", choices=("blocks", "round-robin"), default="blocks",
                    help="blocks (default): each round runs a method for several consecutive calls and counts all but the "
                         "first (the first 3 at M=1); round-robin: one call per method per round (peers' spinning threads then slow the next call)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rotate = (args.rotate_mb or (96 if args.quick else 512)) * 1e6
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    Ms = [1, 8, 128]
    gen = torch.Generator().manual_seed(0)
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3

    huge = memory.hugepages_enabled() and not args.no_hugepages
    bw2, bw1 = read_bandwidth(0.5 if args.quick else 1.0)
    print(f"# pyshrink CPU kernels, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, pyshrink cpu_isa={_C.cpu_isa()}, load average at start {load[0]:.1f}")
    print(f"measured read bandwidth (torch.sum over 1 GB, median of 5): {bw2:.1f} GB/s with 2 threads, "
          f"{bw1:.1f} GB/s with 1 (for reference: the read bandwidth of this VM moves by 10-25 % within minutes, "
          f"so '% of read BW' uses the higher of the two probes timed in each shape's M=1 rounds)")
    print(f"group size {G}, symmetric; weights rotated over >= {rotate / 1e6:.0f} MB per method; schedule {args.schedule}; "
          f"pyshrink's codes and the read probes in huge-page memory: {'yes' if huge else 'no'} "
          f"(THP mode {memory.thp_mode()}; ONNX Runtime and torch keep their own allocations)\n")
    print("| K -> N | M | method | median ms | vs torch f32 | vs ORT acc4 | weight GB/s | % of read BW |")
    print("|---|---|---|---|---|---|---|---|")
    for K, N in shapes:
        methods = make_methods(K, N, rotate, gen, not args.no_ort, huge)
        for M in Ms:
            x = torch.randn(M, K, generator=gen)
            rounds = (25 if M == 1 else 12 if M == 8 else 6) if args.quick else (60 if M == 1 else 25 if M == 8 else 10)
            timed = {n: v for n, v in methods.items() if M == 1 or n not in PROBES}
            if args.schedule == "blocks":  # steady state per method, as in decoding: fewer rounds of longer blocks
                # After the settle every method's first M=1 calls run slow, the read probe's included (median per
                # position in a block of 10, 4096x4096, development measurement: probe 611, 405, 397, 378, 369 us,
                # then ~360; ORT acc4 886, 685, 657, 617, 603, then ~590): 3 are not counted at M=1.
                block, skip = (12, 3) if M == 1 else (4, 1) if M == 8 else (2, 1)
                # budget: the 1 GB probe (~40 ms a call) must run in every M=1 round, as the methods do
                t = time_round_robin(timed, x, max(3, rounds * 2 // block), block=block, settle_s=0.06, skip=skip,
                                     budget_s=10.0 if M == 1 else 4.0)
            else:
                t = time_round_robin(timed, x, rounds)
            if M == 1:  # '% of read BW': the higher of this shape's two in-round probes (Ms starts with 1)
                ref = max(methods[p][1] / t[p] / 1e9 for p in PROBES)
            for name, med in t.items():
                gbs = methods[name][1] / med / 1e9
                ort4 = f"{t['ORT acc4'] / med:.2f}x" if "ORT acc4" in t else "-"
                print(f"| {K} -> {N} | {M} | {name} | {med * 1e3:.3f} | {t['torch f32'] / med:.2f}x | {ort4} | "
                      f"{gbs:.1f} | {100 * gbs / ref:.0f}% |", flush=True)
        del methods
    print("\nact_stats_ (per-channel sum|x|, sum x, sum x^2 in float64) vs the PyTorch expressions:\n")
    print("| x | method | median ms | speedup vs float64 expr | vs float32 expr | GB/s of x |")
    print("|---|---|---|---|---|---|")
    for row in bench_act_stats(8 if args.quick else 20):
        print("| {} | {} | {:.3f} | {:.2f}x | {:.2f}x | {:.1f} |".format(*row))
    try:
        load = os.getloadavg()
        print(f"\nload average at end: {load[0]:.1f} (2 cores; above ~2 other processes competed for them)")
    except OSError:
        pass


if __name__ == "__main__":
    main()
