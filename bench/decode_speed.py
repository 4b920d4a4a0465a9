"""Decode speed of quantized SmolLM2-135M in PyTorch (batch 1) against the float32 model, and llama.cpp.

    python bench/decode_speed.py --threads 2 --rounds 3 --out bench/results/decode_speed.jsonl

Builds the quantized variants once (``--work DIR``; round-to-nearest, or ``--calibration FILE`` for the
calibrated ``auto`` method: the codes do not change the speed, but AWQ's ``input_scale`` on o_proj does add
a multiply), then measures every variant with :func:`pyshrink.benchmark.run_one` (a fresh process each:
prefill a random prompt, then greedy decoding with transformers' KV cache, the LM head on the last position
only), ``--rounds`` times in interleaved order so that load from other processes on the machine hits all
variants alike; the table reports the median over rounds of each run's median per-token time.
llama.cpp (llama-cpp-python) runs the same model's Q4_1 GGUF file, the source of pyshrink's embedded model.

    python bench/decode_speed.py --threads 2 --profile fp32 "q4-g64 + head q4"

``--compiled NAME ...`` adds, for those variants, rows that decode through
:class:`pyshrink.runtime.torch_decoder.TorchDecoder` (``pyshrink bench --compile``): a static KV cache, q|k|v
and gate|up fused, the step through ``torch.compile``; with ``--cpp-wrapper`` also rows with inductor's C++
wrapper. Compilation happens in each run's warm-up (reported as compile s; inductor's on-disk cache makes
repeats faster).

``--ablation NAME ...`` adds rows with one part of that at a time (static cache alone, static cache + fused
projections, compiled without fusing), and one with everything but the thread split (torch on all threads
in the prompt and the step, beside the kernels' pool, instead of on one).

``--profile`` (with ``--profile-compiled``: through TorchDecoder, the op calls only) measures instead
where a decode step's time goes, in this process, with ``torch.profiler``:
each top-level operator's time (children included) by category (the 4-bit or 8-bit linears of the blocks,
the LM head, attention, float matmuls, the other small operators), and the rest of the step's wall time as
Python overhead (transformers' modules, the KV cache, the profiler's own bookkeeping).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> quantize() settings (None: the float32 model itself)
    "fp32": None,
    "q8": dict(bits=8),
    "q4-g64": dict(bits=4, group_size=64),
    "q4-g64 + head q8": dict(bits=4, group_size=64, skip=(), head_bits=8),
    "q4-g64 + head q4": dict(bits=4, group_size=64, skip=(), head_bits=4),
    "q4-g128 + head q4": dict(bits=4, group_size=128, skip=(), head_bits=4),
}


def build(work: Path, names, calibration) -> dict:
    import torch

    import pyshrink
    from pyshrink.models import load_model, save

    torch.set_num_threads(2)
    paths = {}
    for name in names:
        kw = VARIANTS[name]
        if kw is None:
            paths[name] = "smollm2-135m"
            continue
        out = work / name.replace(" ", "").replace("+", "_")
        if not (out / "config.json").is_file():
            model, tok = load_model("smollm2-135m")
            method = "auto" if calibration else "rtn"
            pyshrink.quantize(model, method=method, calibration=calibration, tokenizer=tok, progress=False,
                              **({"calib_tokens": 16384} if calibration else {}), **kw)
            save(model, tok, out, overwrite=True)
        paths[name] = str(out)
    return paths


HEAD_ROWS = 49152  # SmolLM2's vocabulary: the LM head is the only projection with that many outputs


def _category(ev) -> str:
    shapes = [tuple(x) for x in (ev.input_shapes or []) if x]
    if ev.name in ("pyshrink::linear_q4", "pyshrink::linear_q8"):
        head = len(shapes) > 1 and shapes[1][0] == HEAD_ROWS
        return f"LM head ({ev.name[10:]})" if head else f"block linears ({ev.name[10:]})"
    if ev.name in ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm"):
        head = any(HEAD_ROWS in sh for sh in shapes)
        return "LM head (float)" if head else "block linears (float)"
    if "scaled_dot_product" in ev.name:
        return "attention (sdpa)"
    return "other ops (norms, rotary, cache, elementwise)"


def profile_compiled(path: str, name: str, threads: int, prompt_tokens: int, steps: int = 32) -> None:
    """The 4-bit/8-bit op calls inside a TorchDecoder step (compiled, fused): their total time against the step's."""
    import time

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pyshrink.models import load_model
    from pyshrink.runtime.torch_decoder import TorchDecoder

    torch.set_num_threads(threads)
    model = load_model(path, with_tokenizer=False)
    dec = TorchDecoder(model, prompt_tokens + 2 * steps + 16)
    ids = torch.randint(3, 32000, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    tok = int(dec.prefill(ids).argmax())
    for _ in range(8):  # warm-up (the first step compiles)
        tok = int(dec.step(tok).argmax())
    t = time.perf_counter()
    for _ in range(steps):
        tok = int(dec.step(tok).argmax())
    plain_ms = (time.perf_counter() - t) * 1e3 / steps
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            tok = int(dec.step(tok).argmax())
        wall_ms = (time.perf_counter() - t) * 1e3 / steps
    cats: dict = {}
    for ev in prof.events():
        if ev.name.startswith("pyshrink::") or ev.name in ("aten::mm", "aten::addmm"):
            c = _category(ev)
            n, ms = cats.get(c, (0, 0.0))
            cats[c] = (n + 1, ms + ev.cpu_time_total / 1e3)
    print(f"\n{name} (TorchDecoder, compiled, fused): {threads} threads, {plain_ms:.1f} ms/step without the profiler, "
          f"{wall_ms:.1f} ms/step with it\n")
    print("| op calls in a compiled step | calls/step | ms/step (profiled) |")
    print("|---|---|---|")
    for c, (n, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"| {c} | {n / steps:.0f} | {ms / steps:.2f} |")
    print(f"| everything else (inductor's fused loops, attention, the step's Python) | | "
          f"{wall_ms - sum(ms for _, ms in cats.values()) / steps:.2f} |")


def profile(path: str, name: str, threads: int, prompt_tokens: int, steps: int = 32) -> None:
    import time

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from pyshrink.kv_cache import cache_inputs, returned_cache
    from pyshrink.models import load_model

    torch.set_num_threads(threads)
    model = load_model(path, with_tokenizer=False)
    ids = torch.randint(3, 32000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    def step(tok, past):
        out = model(tok, use_cache=True, logits_to_keep=1, **cache_inputs(model, past))
        return out.logits[:, -1:].argmax(-1), returned_cache(out)

    with torch.inference_mode():
        tok, past = step(ids, None)
        for _ in range(8):  # warm-up
            tok, past = step(tok, past)
        t = time.perf_counter()
        for _ in range(steps):
            tok, past = step(tok, past)
        plain_ms = (time.perf_counter() - t) * 1e3 / steps
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                tok, past = step(tok, past)
            wall_ms = (time.perf_counter() - t) * 1e3 / steps
    cats: dict = {}
    n_ops = 0
    for ev in prof.events():
        if ev.cpu_parent is None:  # top-level: called from Python; its time includes its children
            c = _category(ev)
            cats[c] = cats.get(c, 0.0) + ev.cpu_time_total / 1e3 / steps
            n_ops += 1
    cats["Python overhead (rest of the step)"] = wall_ms - sum(cats.values())
    print(f"\n{name}: {threads} threads, {plain_ms:.1f} ms/step without the profiler, {wall_ms:.1f} ms/step "
          f"with it, {n_ops / steps:.0f} top-level operator calls per step\n")
    print("| part of a decode step | ms/step (profiled) | share |")
    print("|---|---|---|")
    for c, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"| {c} | {ms:.2f} | {100 * ms / wall_ms:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default="/tmp/pyshrink-decode-speed")
    ap.add_argument("--calibration", default=None, help="calibrate (method auto) on this text instead of RTN")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--out", default=None, help="append raw rows (JSON lines) here")
    ap.add_argument("--compiled", nargs="*", default=["fp32", "q4-g64 + head q4"], choices=list(VARIANTS),
                    help="also measure these variants through TorchDecoder (static cache, fused, torch.compile)")
    ap.add_argument("--cpp-wrapper", action="store_true", help="and with inductor's cpp_wrapper")
    ap.add_argument("--ablation", nargs="*", default=[], choices=list(VARIANTS),
                    help="also these variants with one part of TorchDecoder at a time: static cache alone, + fused "
                         "projections, compiled without fusing")
    ap.add_argument("--profile", nargs="+", default=None, choices=list(VARIANTS),
                    help="profile these variants' decode steps instead of timing them (see above)")
    ap.add_argument("--profile-compiled", action="store_true", help="profile them through TorchDecoder (compiled)")
    args = ap.parse_args()

    if args.profile:
        paths = build(Path(args.work), args.profile, args.calibration)
        for name in args.profile:
            fn = profile_compiled if args.profile_compiled else profile
            fn(paths[name], name, args.threads, args.prompt_tokens)
        return

    from pyshrink.benchmark import run_one
    from pyshrink.models import embedded_gguf

    paths = build(Path(args.work), list(dict.fromkeys(args.variants + args.compiled + args.ablation)), args.calibration)
    runs = [(name, "torch", paths[name], None) for name in args.variants]
    for name in args.ablation:
        for suffix, options in ((" static cache", {"compile": False, "fuse": False}),
                                (" static cache + fused", {"compile": False, "fuse": True}),
                                (" compiled, not fused", {"compile": True, "fuse": False}),
                                (" compiled + fused, torch on all threads in the step",
                                 {"compile": True, "fuse": True, "torch_threads": args.threads})):
            runs.append((name + suffix, "torch", paths[name], options))
    for name in args.compiled:
        runs.append((f"{name} compiled", "torch", paths[name], {"compile": True, "fuse": True}))
        if args.cpp_wrapper:
            runs.append((f"{name} compiled (cpp_wrapper)", "torch", paths[name],
                         {"compile": True, "fuse": True, "cpp_wrapper": True}))
    if not args.no_llama_cpp:
        runs.append(("llama.cpp Q4_1 (GGUF)", "llama.cpp", str(embedded_gguf("smollm2-135m")), None))
    kw = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads,
              repeats=args.repeats, warmup=1)
    results: dict = {name: [] for name, *_ in runs}
    for rnd in range(args.rounds):
        order = runs if rnd % 2 == 0 else runs[::-1]
        for name, runtime, path, options in order:
            row = run_one(runtime, path, **kw, label=name, options=options)
            row["round"] = rnd
            results[name].append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            msg = row.get("error") or f"{row['decode_ms_median']:.1f} ms/token"
            print(f"round {rnd} {name}: {msg}", file=sys.stderr, flush=True)

    ok = {n: [r for r in rows if "error" not in r] for n, rows in results.items()}
    def med(name):
        return statistics.median(r["decode_ms_median"] for r in ok[name]) if ok.get(name) else None

    base, base_c = med("fp32"), med("fp32 compiled")
    print(f"\nbatch 1, {args.threads} threads, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds x {args.repeats} repeats\n")
    print("| model | runtime | on disk MB | decode ms/token (median) | tokens/s | x float32 eager | x float32 compiled "
          "| prefill ms | peak RSS MB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runtime, _, _ in runs:
        rows = ok[name]
        if not rows:
            print(f"| {name} | {runtime} | - | failed: {results[name][0].get('error', '')[:120]} | | | | | | |")
            continue
        ms = med(name)
        pre = statistics.median(r["prefill_ms"] for r in rows)
        rss = max(r["peak_rss_mb"] for r in rows)
        comp = "/".join(f"{r['compile_s']:.0f}" for r in rows if "compile_s" in r) or "-"
        x = f"{base / ms:.2f}" if base else "-"
        xc = f"{base_c / ms:.2f}" if base_c else "-"
        print(f"| {name} | {runtime} | {rows[0]['disk_mb']:.0f} | {ms:.1f} | {1e3 / ms:.1f} | {x} | {xc} | {pre:.0f} "
              f"| {rss:.0f} | {comp} |")


if __name__ == "__main__":
    main()
