"""Planning from the held calibration tokens against planning from their Gram matrix, in one process.

    python bench/plan_tokens.py switch 13824 5120 0.25 0.375 0.5   # planning time at T = 0.25 C, 0.375 C, 0.5 C
    python bench/plan_tokens.py error 7168 2048 128                 # each way's error against its direct residual
    python bench/plan_tokens.py bands 13824 8192 1024               # float64 bands: fresh or reused, and their size

``switch`` times, for T tokens of C channels (ReLU'd Gaussian, in batches of 512) and a random float64 down
projection to N outputs, the statistics (held adds, or the Gram matrix's sums) plus the least-squares refit of the
fluctuation-ranked half, each way; it is how ``calibration.SAMPLES_PER_CHANNEL`` was chosen. ``error`` refits
both ways on T tokens and prints each refit's error next to the residual computed directly from the tokens in
float64: the tokens' error is exact, the Gram matrix's is limited by its float32 products where the error is a
tiny fraction of ``E||y||^2``. ``bands`` times what ``calibration.float64_bands`` and ``BAND_BYTES`` are for:
converting a 1024-row float32 band to a fresh float64 tensor against copying it into a reused one, and the
products ``Xc W^T`` of T tokens by N outputs with the outputs in bands of GRAM_ROWS rows against
``band_rows(C)`` rows (medians of 5 after a warm-up).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pyshrink.contract import scores
from pyshrink.contract import calibration
from pyshrink.contract.calibration import ChannelStats


def _median_s(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _bands(C, N, T, gen):
    band = torch.randn(calibration.GRAM_ROWS, C, generator=gen)
    buf = torch.empty(band.shape, dtype=torch.float64)
    row = {"fresh .double() s": _median_s(lambda: band.double()),
           "copy_ into a buffer s": _median_s(lambda: buf.copy_(band))}
    Xc, W = torch.randn(T, C, generator=gen, dtype=torch.float64), torch.randn(N, C, generator=gen, dtype=torch.float64)
    Y = torch.empty(T, N, dtype=torch.float64)
    for rows in (calibration.GRAM_ROWS, calibration.band_rows(C)):
        def products():
            for o0, o1 in calibration.row_bands(N, rows):
                torch.matmul(Xc, W[o0:o1].T, out=Y[:, o0:o1])
        row[f"products in bands of {rows} s"] = _median_s(products)
    return row


def _inputs(C, N, T, gen):
    xs = [torch.randn(min(512, T - i), C, generator=gen).relu_() for i in range(0, T, 512)]
    return xs, torch.randn(N, C, generator=gen, dtype=torch.float64) / C ** 0.5


def _plan(xs, W, held):
    C, T = W.shape[1], sum(map(len, xs))
    t0 = time.perf_counter()
    st = ChannelStats(C, max_samples=T if held else 0)
    for x in xs:
        st.add(x)
    t1 = time.perf_counter()
    layer = scores.Layer(W, None, st)
    keep = scores.kept_groups(layer, scores.fluctuation(layer, C // 2))
    w, b, err = scores.refit_with_error(layer, keep)
    return keep, w, b, err, t1 - t0, time.perf_counter() - t1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["switch", "error", "bands"])
    ap.add_argument("channels", type=int)
    ap.add_argument("out", type=int)
    ap.add_argument("tokens", type=float, nargs="+", help="switch: fractions of the channels; error: a token count")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    if args.mode == "bands":
        T = int(args.tokens[0])
        print(json.dumps({"tokens": T, **_bands(args.channels, args.out, T, gen)}))
        return
    for t in args.tokens:
        T = int(t * args.channels) if args.mode == "switch" else int(t)
        xs, W = _inputs(args.channels, args.out, T, gen)
        row = {"tokens": T}
        for held, name in ((True, "tokens"), (False, "gram")):
            keep, w, b, err, t_stats, t_refit = _plan(xs, W, held)
            if args.mode == "switch":
                row.update({f"{name} stats s": t_stats, f"{name} refit s": t_refit, f"{name} total s": t_stats + t_refit})
            else:
                X = torch.cat(xs).double()
                row[f"{name} error"] = err
                row[f"{name} direct residual"] = float((X[:, keep] @ w.T + b - X @ W.T).pow(2).sum(1).mean())
        if args.mode == "error":
            row["E||y||^2"] = float((torch.cat(xs).double() @ W.T).pow(2).sum(1).mean())
        print(json.dumps(row), flush=True)
        del xs, W


if __name__ == "__main__":
    main()
