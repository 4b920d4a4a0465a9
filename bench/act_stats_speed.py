"""act_stats_ alone, on calibration-like inputs, optionally side by side with another built checkout.

    python bench/act_stats_speed.py                              # this checkout
    python bench/act_stats_speed.py --baseline ../old --rounds 5  # beside another checkout (bench/ab.py)

Each shape's inputs (float32 unless named) are rotated over >= 200 MB, so x comes from memory, not cache; the
figure is the median of 41 calls after 2 warm-up calls, 2 kernel threads, and with ``--baseline`` the median of
that over the alternating rounds. bench/kernels.py compares the op with the PyTorch expressions instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import child_script, cli  # noqa: E402

SHAPES = ([16384, 576, "float32"], [16384, 1536, "float32"], [2048, 4096, "float32"], [2048, 4096, "bfloat16"],
          [32768, 288, "float32"], [16, 1 << 20, "float32"])

CHILD = child_script(r"""
res = {}
for R, C, dt in json.loads(sys.argv[2]):
    n = max(2, -(-200_000_000 // (R * C * 4)))
    xs = [torch.randn(R, C, generator=gen).to(getattr(torch, dt)) for _ in range(n)]
    acc, cnt = ops.new_accumulators(C)
    ts = []
    for i in range(43):
        x = xs[i % n]
        t = time.perf_counter_ns()
        torch.ops.pyshrink.act_stats_(x, acc, cnt)
        ts.append(time.perf_counter_ns() - t)
    res[f"{R}x{C} {dt}"] = statistics.median(ts[2:]) / 1e6
    del xs
print(json.dumps(res))
""", threads=2)


def main(argv=None):
    meds = cli(__doc__, CHILD, SHAPES, argv)
    names = list(meds)
    print("| x | " + " | ".join(f"{n} ms" for n in names) + (" | speed-up |" if len(names) == 2 else " |"))
    print("|---|" + "---|" * (len(names) + (len(names) == 2)))
    for key in meds[names[0]]:
        row = [meds[n][key] for n in names]
        extra = f" | {row[0] / row[1]:.2f}x" if len(row) == 2 else ""
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in row) + extra + " |")


if __name__ == "__main__":
    main()
