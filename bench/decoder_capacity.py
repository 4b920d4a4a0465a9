"""TorchDecoder's one-token step against its KV cache's capacity: transformers' sdpa attention, which copies the
static cache per query head under torch.compile and attends over the whole capacity, against pyshrink's
attention (pyshrink.runtime.attention: queries regrouped per key/value head, the filled positions only).

    python bench/decoder_capacity.py --rounds 6            # SmolLM2-135M q4-g64 + 4-bit head, 2 threads

For each capacity (``--capacities``), two compiled TorchDecoders on two copies of the same model, one with the
attention switch turned off, decode from the same 64-token prompt; rounds alternate between them, each round
timing ``--steps`` consecutive steps per decoder (a decoder whose cache would overflow is restarted from its
prompt, untimed). The table gives the median over rounds of each round's median step, and the speed-up.
The model is built as bench/decode_speed.py builds it (round-to-nearest, in ``--work``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="q4-g64 + head q4", help="a bench/decode_speed.py variant")
    ap.add_argument("--work", default="/tmp/pyshrink-decode-speed", help="where bench/decode_speed.py's variants are built")
    ap.add_argument("--capacities", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per decoder per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error("--rounds and --steps must be at least 1")
    if min(args.capacities) < args.prompt_tokens + args.steps + 1:
        ap.error(f"every capacity must hold the prompt and one round's steps (>= {args.prompt_tokens + args.steps + 1})")

    import torch

    import decode_speed
    from pyshrink.models import load_model
    from pyshrink.runtime import torch_decoder
    from pyshrink.runtime.torch_decoder import TorchDecoder

    torch.set_num_threads(args.threads)
    path = decode_speed.build(Path(args.work), [args.variant], None)[args.variant]
    prompt = torch.randint(3, 32000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    switch = torch_decoder.attention.use_for_decoding
    models = {"transformers sdpa": load_model(path, with_tokenizer=False),
              "regrouped (pyshrink)": load_model(path, with_tokenizer=False)}
    decoders = {}  # (capacity, name) -> [decoder, next token, round medians]
    for cap in args.capacities:
        for name, model in models.items():
            torch_decoder.attention.use_for_decoding = switch if name.startswith("regrouped") else (lambda m: False)
            try:
                dec = TorchDecoder(model, cap, threads=args.threads)
            finally:
                torch_decoder.attention.use_for_decoding = switch
            t = time.perf_counter()
            tok = int(dec.prefill(prompt).argmax())
            for _ in range(3):  # the first step compiles
                tok = int(dec.step(tok).argmax())
            print(f"capacity {cap}, {name}: attention switched: {dec.gqa_attention}, warm-up {time.perf_counter() - t:.0f} s",
                  file=sys.stderr, flush=True)
            decoders[(cap, name)] = [dec, tok, []]
    for rnd in range(args.rounds):
        order = list(decoders.items())
        for _, entry in (order if rnd % 2 == 0 else order[::-1]):
            dec, tok, meds = entry
            if dec.length + args.steps >= dec.max_length:
                tok = int(dec.prefill(prompt).argmax())
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                tok = int(dec.step(tok).argmax())
                times.append(time.perf_counter() - t)
            entry[1] = tok
            meds.append(statistics.median(times))
    names = list(models)
    print(f"\n{args.variant}, {args.threads} threads, {args.prompt_tokens}-token prompt, {args.rounds} rounds of "
          f"{args.steps} steps (positions {args.prompt_tokens + 3}-{args.prompt_tokens + 3 + args.rounds * args.steps}, "
          f"after 3 warm-up steps, or restarted)\n")
    print(f"| capacity (max_length) | {names[0]} ms/step | {names[1]} ms/step | speed-up |")
    print("|---|---|---|---|")
    for cap in args.capacities:
        a, b = (statistics.median(decoders[(cap, n)][2]) * 1e3 for n in names)
        print(f"| {cap} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
