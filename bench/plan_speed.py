"""Planning one block's MLP contraction: the time and memory of its float64 statistics and least-squares refit.

    python bench/plan_speed.py                                # this checkout, 13824 -> 5120, 2048 tokens
    python bench/plan_speed.py --baseline ../old --rounds 2   # side by side with another built checkout

What contraction does for every candidate block, on a synthetic down projection (``--channels`` neurons reading
into ``--out`` features, an ``nn.Linear`` in ``--dtype``) and ``--tokens`` ReLU'd Gaussian activations added in
batches of 512:

* ``gram``: ``ChannelStats.add`` over the batches (the calibration hooks' per-channel sums and Gram matrix, or,
  for at most ``SAMPLES_PER_CHANNEL * channels`` tokens, the tokens themselves);
* ``layer``: ``neurons.down_layer``, the projection as planning reads it (``layer GiB``: what it keeps);
* ``rank``: the default criterion (fluctuation) choosing half the neurons;
* ``refit``: the least-squares refit of the kept half and its output error (the block's cost, which chooses the
  blocks), i.e. ``scores.refit`` + ``scores.output_error`` where ``scores.refit_with_error`` does not exist.

The default shape is the 11.4 B model's of "Streamed contraction" in bench/RESULTS.md (hidden 5120, MLP 13824,
2048 calibration tokens). Each checkout runs in its own process; peak memory is the process's resident set above
what it held before the stage (sampled every 5 ms), with the Gram matrix's own pages made resident beforehand;
``plan peak GiB`` is the highest of layer, rank and refit above what the process held before the layer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import alternate, checkouts, child_script  # noqa: E402

CHILD = child_script(r"""
import threading, types, psutil
from pyshrink.contract import neurons, scores
from pyshrink.contract.calibration import ChannelStats
C, OUT, T, DTYPE = json.loads(sys.argv[2])
proc = psutil.Process()
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
res = {}
def stage(name, fn):
    time.sleep(0.02)
    base = proc.memory_info().rss
    peak[0] = base
    t = time.perf_counter()
    out = fn()
    res[name + " s"] = time.perf_counter() - t
    time.sleep(0.02)
    res[name + " peak GiB"] = (peak[0] - base) / 2**30
    return out
xs = [torch.randn(512, C, generator=gen).relu_() for _ in range(max(1, T // 512))]
stats = ChannelStats(C)
if not hasattr(stats, "samples") or sum(map(len, xs)) > stats.max_samples:  # planned from the Gram matrix:
    stats.gram.zero_()  # its pages resident before the first stage, so the peaks below are what the stages add
stage("gram", lambda: [stats.add(x) for x in xs])
del xs
down = torch.nn.Linear(C, OUT, bias=False, dtype=getattr(torch, DTYPE))
with torch.no_grad():
    down.weight.copy_(torch.randn(OUT, C, generator=gen, dtype=torch.float64) / C ** 0.5)
adapter = types.SimpleNamespace(mlp_out_module=lambda block: block, mlp_in_modules=lambda block: [])
time.sleep(0.02)
before_layer = proc.memory_info().rss
layer = stage("layer", lambda: neurons.down_layer(adapter, down, stats))
res["layer GiB"] = (proc.memory_info().rss - before_layer) / 2**30
plan_peak = res["layer peak GiB"]
keep = stage("rank", lambda: scores.kept_groups(layer, scores.fluctuation(layer, C // 2)))
plan_peak = max(plan_peak, res["layer GiB"] + res["rank peak GiB"])
def refit():
    if hasattr(scores, "refit_with_error"):
        return scores.refit_with_error(layer, keep)[2]
    w, b = scores.refit(layer, keep)
    return scores.output_error(layer, keep, w, b)
res["error"] = stage("refit", refit)
res["plan peak GiB"] = max(plan_peak, res["layer GiB"] + res["refit peak GiB"])
res["total s"] = res["gram s"] + res["layer s"] + res["rank s"] + res["refit s"]
print(json.dumps(res))
""", threads=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=13824, help="neurons: the down projection's input width")
    ap.add_argument("--out", type=int, default=5120, help="the down projection's output width (the hidden size)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens, added in batches of 512")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32", "bfloat16"],
                    help="the down projection's dtype (a source model's; default float64)")
    ap.add_argument("--baseline", type=Path, help="another checkout of pyshrink, built in place, to time beside this one")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds with --baseline (default 2)")
    args = ap.parse_args(argv)
    repos = checkouts(ap, args.baseline)
    meds = alternate(CHILD, repos, args.rounds if args.baseline is not None else 1,
                     [args.channels, args.out, args.tokens, args.dtype])
    names = list(meds)
    print(f"{args.channels} -> {args.out} ({args.dtype}), {args.tokens} tokens, 2 threads; medians of "
          f"{args.rounds if args.baseline is not None else 1} run(s) per checkout")
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in meds[names[0]]:
        print(f"| {key} | " + " | ".join(f"{meds[n][key]:.4g}" for n in names) + " |")


if __name__ == "__main__":
    main()
