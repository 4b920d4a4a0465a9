"""Fixed cost of one small linear_q4 call: what a decode step pays ~120 times per token besides streaming weights.

    python bench/call_overhead.py                       # this checkout
    python bench/call_overhead.py --baseline ../old     # side by side with another built checkout

M = 1, N = 8 (the weights stay in cache, so the time is the call's set-up: dispatch, allocation, the
activations' quantization or layout, and the pool), K in {128, 4096, 11008}, g = 64 symmetric, float32, one
kernel thread. Each checkout is timed in its own process (two builds of pyshrink._C cannot share one); with
``--baseline`` the processes alternate for ``--rounds`` rounds and the table gives the median over rounds of
each process's median call time (20,000 calls after 2,000 warm-up calls).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import child_script, cli  # noqa: E402

KS = (128, 4096, 11008)

CHILD = child_script(r"""
res = {}
for K in json.loads(sys.argv[2]):
    nb = K // 64
    packed = torch.randint(0, 256, (8, nb, 32), dtype=torch.uint8, generator=gen)
    scales = torch.randn(8, nb, generator=gen) * 0.01
    zp = torch.empty(0, dtype=torch.uint8)
    x = torch.randn(1, K, generator=gen)
    for fast in (True, False):
        call = lambda: torch.ops.pyshrink.linear_q4(x, packed, scales, zp, None, fast)
        for _ in range(2000):
            call()
        ts = []
        for _ in range(20000):
            t = time.perf_counter_ns()
            call()
            ts.append(time.perf_counter_ns() - t)
        res[f"{K} {'fast' if fast else 'exact'}"] = statistics.median(ts) / 1e3
print(json.dumps(res))
""", threads=1)


def main(argv=None):
    meds = cli(__doc__, CHILD, KS, argv)
    names = list(meds)
    print("| K | mode | " + " | ".join(f"{n} us" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for key in meds[names[0]]:
        K, mode = key.split()
        print(f"| {K} | {mode} | " + " | ".join(f"{meds[n][key]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
