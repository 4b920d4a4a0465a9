"""linear_q4 speed of this checkout, optionally beside another built checkout.

    python bench/linear_speed.py                          # this checkout
    python bench/linear_speed.py --baseline ../old         # side by side with another built checkout

For a kernel change, the before-and-after companion of bench/kernels.py (which times one build against its
peers): each checkout runs in its own process (two builds of pyshrink._C cannot share one), the processes
alternating for ``--rounds`` rounds, and the table gives the median over rounds of each process's median.
Shapes 4096 -> 4096, 4096 -> 11008 and 11008 -> 4096, g = 64 symmetric, float32 activations, 2 threads, fast
and exact mode, weights rotated over 256 MB so that every call reads them from memory. Every process also
times a bare read of the same bytes (torch.sum over rotated float32 buffers of the 4-bit weights' size) in the
same interleaved blocks, so '% of read' compares each build with the memory bandwidth it had at that moment.
Then fast mode on one weight called over and over (in cache: the arithmetic's own rate), medians of 30 calls:
M = 1 on 4096 x 4096 (9.4 MB, in L3: how far the GEMV could outrun memory), M = 8 and 128 on 4096 x 4096
(prefill and batches, compute bound), M = 8 and 64 on 576 -> 1536 (SmolLM2's MLP).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import child_script, cli  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))
GEMMS = ((1, 4096, 4096), (8, 4096, 4096), (128, 4096, 4096), (8, 576, 1536), (64, 576, 1536))

CHILD = child_script(r"""
def settle(s):  # busy wait: a sleeping main thread lets the VM idle the vCPU (see bench/kernels.py, settle)
    end = time.perf_counter() + s
    while time.perf_counter() < end:
        pass

res = {}
shapes, gemms = json.loads(sys.argv[2])
for K, N in shapes:
    nb = K // 64
    nbytes = N * nb * 32 + N * nb * 4
    copies = max(2, -(-256_000_000 // nbytes))
    ws = [(torch.randint(0, 256, (N, nb, 32), dtype=torch.uint8, generator=gen), torch.randn(N, nb, generator=gen) * 0.01)
          for _ in range(copies)]
    reads = [torch.ones(nbytes // 4) for _ in range(copies)]
    zp = torch.empty(0, dtype=torch.uint8)
    x = torch.randn(1, K, generator=gen)
    calls = {
        "fast": [lambda p=p, s=s: torch.ops.pyshrink.linear_q4(x, p, s, zp, None, True) for p, s in ws],
        "exact": [lambda p=p, s=s: torch.ops.pyshrink.linear_q4(x, p, s, zp, None, False) for p, s in ws],
        "read": [lambda b=b: b.sum() for b in reads],
    }
    ts = {k: [] for k in calls}
    i = 0
    for r in range(22):
        for k, fns in calls.items():
            settle(0.03)
            for j in range(12):  # blocks of 12 calls, the first 3 not counted (they start slow after a switch)
                t = time.perf_counter()
                fns[i % len(fns)]()
                dt = time.perf_counter() - t
                i += 1
                if r >= 2 and j >= 3:
                    ts[k].append(dt)
    read = nbytes / statistics.median(ts["read"]) / 1e9
    for k in ("fast", "exact"):
        med = statistics.median(ts[k])
        res[f"{K}->{N} {k} us"] = med * 1e6
        res[f"{K}->{N} {k} % of read"] = 100 * nbytes / med / 1e9 / read
    res[f"{K}->{N} read GB/s"] = read
for M, K, N in gemms:
    p, s = torch.randint(0, 256, (N, K // 64, 32), dtype=torch.uint8, generator=gen), torch.randn(N, K // 64, generator=gen) * 0.01
    x = torch.randn(M, K, generator=gen)
    zp = torch.empty(0, dtype=torch.uint8)
    for _ in range(5):
        torch.ops.pyshrink.linear_q4(x, p, s, zp, None, True)
    ts = []
    for _ in range(30):
        t = time.perf_counter()
        torch.ops.pyshrink.linear_q4(x, p, s, zp, None, True)
        ts.append(time.perf_counter() - t)
    res[f"M={M},{K}->{N} fast us"] = statistics.median(ts) * 1e6
print(json.dumps(res))
""", threads=2)


def main(argv=None):
    meds = cli(__doc__, CHILD, [SHAPES, GEMMS], argv)
    names = list(meds)
    print("| shape | measure | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for key in meds[names[0]]:
        shape, what = key.split(" ", 1)
        print(f"| {shape} | {what} | " + " | ".join(f"{meds[n][key]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
