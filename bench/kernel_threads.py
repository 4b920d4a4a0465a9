"""Whose threads pyshrink's kernels run on, three ways side by side in one process (csrc/cpu/parallel.h).

    python bench/kernel_threads.py [--rounds 6] [--work DIR]

* "torch's threads": the kernels follow torch's count (the default) and run on torch's own intra-op threads;
* "pool beside torch": the kernels' count set apart (``pyshrink.ops.set_num_threads(2)``) with torch on 2
  threads too, so pyshrink's pool runs beside torch's OpenMP workers (what the default was before 0e02f9d);
* "split": ``kernel_threads(2, torch_threads=1)``, TorchDecoder's setting for the prompt and each step.

Measured, 2 threads: SmolLM2-135M 4-bit (g = 64, 4-bit head; built once into ``--work`` by round-to-nearest,
as bench/decode_speed.py builds it) in eager transformers: a 64-token prompt and one-token steps with its
KV cache; and single calls of linear_q4 fast mode: M = 64 on 576 -> 1536 right after a torch add of 64 x 1536
elements (a prompt's GEMM between torch operators), and M = 1 on 576 -> 1536 on its own (a decode step's
small GEMV, nothing else running). The settings alternate within every round; the table gives medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's build
from decode_speed import build  # noqa: E402

from pyshrink.kv_cache import cache_inputs, returned_cache  # noqa: E402
from pyshrink.models import load_model  # noqa: E402
from pyshrink.ops import kernel_threads, set_num_threads  # noqa: E402

SETTINGS = ("torch's threads", "pool beside torch", "split")


def setting(name):
    if name == "split":
        return kernel_threads(2, torch_threads=1)
    return kernel_threads(2, torch_threads=2) if name == "pool beside torch" else _follow()


class _follow:
    def __enter__(self):
        set_num_threads(0)
        torch.set_num_threads(2)

    def __exit__(self, *exc):
        return False


def timed(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--work", default="/tmp/pyshrink-decode-speed", help="where the quantized model is built once (as bench/decode_speed.py)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(2)
    path = build(Path(args.work), ["q4-g64 + head q4"], None)["q4-g64 + head q4"]
    model = load_model(path, with_tokenizer=False)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=gen)

    def prefill():
        return model(prompt, use_cache=True, logits_to_keep=1)

    def steps():
        out = prefill()
        past, tok = returned_cache(out), out.logits[0, -1].argmax().view(1, 1)

        def step():
            nonlocal past, tok
            o = model(tok, use_cache=True, logits_to_keep=1, **cache_inputs(model, past))
            past, tok = returned_cache(o), o.logits[0, -1].argmax().view(1, 1)
        return timed(step, 16)

    zp = torch.empty(0, dtype=torch.uint8)
    p = torch.randint(0, 256, (1536, 9, 32), dtype=torch.uint8, generator=gen)
    s = torch.randn(1536, 9, generator=gen) * 0.01
    x64, x1 = torch.randn(64, 576, generator=gen), torch.randn(1, 576, generator=gen)
    a, b = torch.randn(64, 1536, generator=gen), torch.randn(64, 1536, generator=gen)

    def gemm_after_add():
        ts = []
        for _ in range(20):
            torch.add(a, b)
            t = time.perf_counter()
            torch.ops.pyshrink.linear_q4(x64, p, s, zp, None, True)
            ts.append(time.perf_counter() - t)
        return ts

    measures = {
        "64-token prompt ms": lambda: timed(prefill, 2),
        "one-token step ms": steps,
        "GEMM 64 x 576 -> 1536 after a torch add us": gemm_after_add,
        "GEMV 1 x 576 -> 1536 alone us": lambda: timed(lambda: torch.ops.pyshrink.linear_q4(x1, p, s, zp, None, True), 200),
    }
    scale = {k: 1e3 if k.endswith("ms") else 1e6 for k in measures}
    res = {(m, st): [] for m in measures for st in SETTINGS}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            for st in order:
                with setting(st):
                    for m, fn in measures.items():
                        fn()  # warm-up under this setting (its threads started, spinning as in use)
                        ts = fn()
                        if r:
                            res[(m, st)].extend(ts)
    set_num_threads(0)
    print(f"{args.rounds} rounds, 2 threads, SmolLM2-135M q4-g64 + head q4 (eager transformers), medians\n")
    print("| measure | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for m in measures:
        print(f"| {m} | " + " | ".join(f"{statistics.median(res[(m, st)]) * scale[m]:.1f}" for st in SETTINGS) + " |")


if __name__ == "__main__":
    main()
