"""linear_q4 fast mode, M = 1, on codes in plain memory against the same codes in huge pages, in one process.

    python bench/hugepages.py [--rounds 12]

What pyshrink.ops.memory buys: every shape's weights (g = 64 symmetric, rotated over 400 MB so that each call
reads them from memory) exist twice, once as torch allocated them (4 KiB pages where the THP mode is
'madvise') and once copied by ``in_hugepages``; torch.sum over float32 buffers of the same size, in both kinds of
memory, reads beside them. Methods alternate in blocks of 12 calls (the first 3 of each block not counted), so
all four see the same memory bandwidth; the table gives medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's build
from pyshrink.ops import memory  # noqa: E402

G = 64


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    if not memory.hugepages_enabled():
        sys.exit(f"huge-page copies are off here (THP mode {memory.thp_mode()}, PYSHRINK_HUGEPAGES): nothing to compare")
    torch.set_num_threads(2)
    zp = torch.empty(0, dtype=torch.uint8)
    print(f"THP mode {memory.thp_mode()}, 2 threads, g = {G}, M = 1, fast mode\n")
    print("| K -> N | fast, plain us | fast, huge pages us | speed-up | torch.sum plain us | torch.sum huge pages us "
          "| fast / sum, plain | fast / sum, huge pages |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for K, N in [(4096, 4096), (4096, 11008), (11008, 4096)]:
        nb = K // G
        q_bytes = N * nb * (G // 2 + 4)
        copies = max(2, int(400e6 // q_bytes))
        plain = [(torch.randint(0, 256, (N, nb, G // 2), dtype=torch.uint8, generator=gen), torch.randn(N, nb, generator=gen) * 0.01)
                 for _ in range(copies)]
        huge = [(memory.in_hugepages(p), s) for p, s in plain]
        flat = [torch.ones(q_bytes // 4) for _ in range(copies)]
        flat_huge = [memory.in_hugepages(t) for t in flat]
        x = torch.randn(1, K, generator=gen)
        methods = {
            "plain": lambda i: torch.ops.pyshrink.linear_q4(x, *plain[i % copies], zp, None, True),
            "huge": lambda i: torch.ops.pyshrink.linear_q4(x, *huge[i % copies], zp, None, True),
            "sum plain": lambda i: flat[i % copies].sum(),
            "sum huge": lambda i: flat_huge[i % copies].sum(),
        }
        times = {k: [] for k in methods}
        i = 0
        for r in range(args.rounds + 2):
            for name, fn in methods.items():
                for b in range(12):
                    i += 1
                    t = time.perf_counter()
                    fn(i)
                    dt = time.perf_counter() - t
                    if r >= 2 and b >= 3:
                        times[name].append(dt)
        m = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        print(f"| {K} -> {N} | {m['plain']:.0f} | {m['huge']:.0f} | {m['plain'] / m['huge']:.2f}x | {m['sum plain']:.0f} | "
              f"{m['sum huge']:.0f} | {100 * m['sum plain'] / m['plain']:.0f} % | {100 * m['sum huge'] / m['huge']:.0f} % |",
              flush=True)
        del plain, huge, flat, flat_huge


if __name__ == "__main__":
    main()
