"""Time one linear_q4 shape by CUDA-graph replay (no launch gaps) and, under Nsight Compute, give it one
launch to profile. bench/gpu_check.sh's `profile` step runs it both ways.

    python bench/cuda_profile.py --m 1 [--k 8192 --n 8192 --group-size 64]
    ncu --kernel-name regex:linear_q4_mma --launch-skip 3 --launch-count 1 python bench/cuda_profile.py --m 1

Launches 1-3 are warm-up, launch 4 is the one to profile, then 40 calls over 8 weight copies (more than L2
holds at K = N = 8192) are captured in a graph and replayed 20 times; the median per call is printed.
"""
from __future__ import annotations

import argparse
import statistics

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    args = ap.parse_args(argv)
    import pyshrink.ops as ops

    w = (torch.randn(args.n, args.k, device="cuda") * 0.02).half()
    packed, scales, zp = ops.quantize_q4(w, args.group_size, True)
    x = torch.randn(args.m, args.k, device="cuda").half()
    for _ in range(4):  # 3 warm-up launches, then the one to profile
        ops.linear_q4(x, packed, scales, zp)
    torch.cuda.synchronize()
    copies = [(packed.clone(), scales.clone(), zp.clone()) for _ in range(8)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(40):
            ops.linear_q4(x, *copies[i % 8])
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    per_call = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 40 * 1e3)
    us = statistics.median(per_call)
    weight_bytes = packed.numel() + scales.numel() * 4
    print(f"linear_q4 M={args.m} K={args.k} N={args.n} g{args.group_size}: {us:.1f} us per call (graph replay), "
          f"{weight_bytes / (us * 1e-6) / 1e9:.0f} GB/s of weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
