"""Contraction quality on SmolLM2-135M against structured-pruning baselines at equal parameter counts.

Calibration: the first ``--calibration-tokens`` tokens of wikitext-2-valid; evaluation: perplexity on the
held-out last ``--eval-tokens`` tokens of the same file (512-token windows). Rows:

* pyshrink at defaults (0.5 x 8 layers), calibrated and data-free, through the public API (timed);
* baselines implemented here, removing exactly as many MLP neurons as pyshrink, from the same calibration
  statistics: random, weight magnitude (L2 norm of a neuron's gate/up rows and down column), Wanda-sp
  (sum_i |W_down[i, j]| * ||x_j||_2, uniform ratio over all layers, no compensation) and FLAP (fluctuation
  Var(x_j) * ||W_down[:, j]||^2, standardized per layer and ranked globally = adaptive structure, with the
  mean-compensation bias);
* a size-vs-perplexity curve (5-30 % fewer parameters) for pyshrink and every baseline;
* pyshrink with vocabulary pruning at defaults (domain = the wikitext file's calibration + evaluation text).

    python bench/contract_quality.py              # the full run recorded in bench/RESULTS.md
    python bench/contract_quality.py --quick      # smoke run, small token counts
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyshrink  # noqa: E402
from pyshrink import data  # noqa: E402
from pyshrink.arch import adapter_for  # noqa: E402
from pyshrink.arch.linears import weight_out_in  # noqa: E402
from pyshrink.contract import calibration as calib  # noqa: E402
from pyshrink.contract import layer_selection, neurons, scores  # noqa: E402
from pyshrink.evaluate import perplexity  # noqa: E402
from pyshrink.models import load_model, num_params  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"


def _mlp(ad, block):
    down = ad.mlp_out_module(block)
    W = weight_out_in(down).detach().double()
    ins = [weight_out_in(m).detach().double() for m in ad.mlp_in_modules(block)]
    return W, ins


# ---- baselines: fn(per-layer stats, model, adapter, total neurons to remove) -> {layer: removed indices} ----

def _uniform(total, widths):
    """Spread ``total`` removals over all layers as evenly as possible."""
    n = len(widths)
    base, extra = divmod(total, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def random_baseline(stats, model, ad, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = [ad.mlp_width(b) for b in ad.blocks(model)]
    return {i: torch.randperm(w, generator=g)[:k] for i, (w, k) in enumerate(zip(widths, _uniform(total, widths))) if k}


def magnitude_baseline(stats, model, ad, total):
    out = {}
    widths = [ad.mlp_width(b) for b in ad.blocks(model)]
    for i, (b, k) in enumerate(zip(ad.blocks(model), _uniform(total, widths))):
        W, ins = _mlp(ad, b)
        score = W.norm(dim=0) + sum(x.norm(dim=1) for x in ins)
        out[i] = score.argsort()[:k]
    return out


def wanda_sp_baseline(stats, model, ad, total):
    out = {}
    widths = [ad.mlp_width(b) for b in ad.blocks(model)]
    for i, (b, k) in enumerate(zip(ad.blocks(model), _uniform(total, widths))):
        W, _ = _mlp(ad, b)
        score = (W.abs() * stats[i].l2[None, :]).sum(0)
        out[i] = score.argsort()[:k]
    return out


def flap_baseline(stats, model, ad, total):
    zs = []
    for i, b in enumerate(ad.blocks(model)):
        W, _ = _mlp(ad, b)
        f = stats[i].variance * W.pow(2).sum(0)
        zs.append((f - f.mean()) / f.std())
    flat = torch.cat(zs)
    layer_of = torch.cat([torch.full((len(z),), i) for i, z in enumerate(zs)])
    idx_in = torch.cat([torch.arange(len(z)) for z in zs])
    order = flat.argsort()
    out = {}
    per_layer_cap = {i: int(0.9 * len(z)) for i, z in enumerate(zs)}
    for j in order.tolist():
        if sum(len(v) for v in out.values()) >= total:
            break
        li = int(layer_of[j])
        cur = out.setdefault(li, [])
        if len(cur) < per_layer_cap[li]:
            cur.append(int(idx_in[j]))
    return {i: torch.tensor(v) for i, v in out.items() if v}


BASELINES = {"random": (random_baseline, "none"), "magnitude": (magnitude_baseline, "none"),
             "wanda-sp": (wanda_sp_baseline, "none"), "flap": (flap_baseline, "mean")}


def apply_removal(base, ad, stats, removal, refit):
    m = copy.deepcopy(base)
    for i, rm in removal.items():
        p = neurons.plan(ad, ad.blocks(m)[i], stats[i], remove=rm, refit=refit)
        neurons.apply(m, ad, i, p.keep, p.weight, p.bias)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--curve-eval-tokens", type=int, default=4096)
    ap.add_argument("--curve-layers", default="5,10,20,30", help="layers contracted at ratio 0.5 per curve point")
    ap.add_argument("--rows", default="calibrated,data-free,vocab", help="pyshrink API rows to run")
    ap.add_argument("--no-baselines", action="store_true", help="skip the baselines at the defaults' size")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4k calibration / 2k evaluation tokens")
    ap.add_argument("--json", type=Path, help="also write all numbers here")
    args = ap.parse_args()
    if args.quick:
        args.calibration_tokens, args.eval_tokens, args.curve_eval_tokens, args.curve_layers = 4096, 2048, 2048, "5,15"
    torch.set_num_threads(2)
    results = {"args": {k: str(v) for k, v in vars(args).items()}}

    base, tok = load_model("smollm2-135m")
    ad = adapter_for(base)
    ids = data.tokenize(tok, WIKI.read_text())
    cal_ids = ids[: args.calibration_tokens]
    eval_ids = ids[-args.eval_tokens:]
    cal_text = tok.decode(cal_ids)
    eval_text = tok.decode(eval_ids)
    P0 = num_params(base)

    def ppl(model, n=None):
        e = eval_ids if n is None else eval_ids[-n:]
        return perplexity(model, ids=e, seq_len=512, progress=False)

    t = time.perf_counter()
    ppl_src = ppl(base)
    ppl_src_curve = ppl(base, args.curve_eval_tokens)
    print(f"source: {P0:,} params, ppl {ppl_src:.3f} ({args.eval_tokens} tokens), {ppl_src_curve:.3f} "
          f"(curve, last {args.curve_eval_tokens})  [{time.perf_counter() - t:.0f}s]", flush=True)
    results["source"] = {"params": P0, "ppl": ppl_src, "ppl_curve": ppl_src_curve}

    # ---- pyshrink through the public API, defaults -------------------------------------------------------
    rows = []
    api_rows = {"calibrated": ("pyshrink calibrated", dict(calibration=cal_text)),
                "data-free": ("pyshrink data-free", dict()),
                "vocab": ("pyshrink calibrated + vocab", dict(calibration=cal_text, prune_vocab=True))}
    for name, kw in [api_rows[r] for r in args.rows.split(",") if r]:
        # the API measures on the first 512 held-out tokens only (its own summary); the table uses all of them
        cpu, wall = time.process_time(), time.perf_counter()
        res = pyshrink.contract((base, tok), eval_text=eval_text, calibration_tokens=args.calibration_tokens,
                                eval_tokens=512, progress=False, **kw)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        s = res.summary
        p = ppl(res.model)
        row = dict(method=name, params=s["params_after"], reduction_pct=s["reduction_pct"], ppl=p,
                   ratio=p / ppl_src, contraction_s=s["contraction_time_s"],
                   wall_s=wall, cpu_s=cpu, layers=[r["layer"] for r in s["layers"]], vocab=s["vocab"])
        if kw.get("prune_vocab"):
            # the kept ids include the evaluation text's, and the drop renormalises the softmax over them: this
            # figure is flattered by the test text's own vocabulary. The full-vocabulary perplexity is the
            # calibrated row's (the same contraction; the kept logits are unchanged), so none is claimed here.
            row.update(ppl=None, ratio=None, ppl_renormalised_over_kept_ids=p)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del res

    results["defaults"], results["curve"] = rows, []
    if args.no_baselines and not [x for x in args.curve_layers.split(",") if x]:
        return finish(results, args)

    # ---- one statistics pass shared by the curve and the baselines --------------------------------------
    win = data.windows(cal_ids, 512)
    batches = [win[i:i + 4] for i in range(0, len(win), 4)]
    observed = calib.observe_blocks(base, ad, batches, lambda i, b, o: (o.mlp, o.out_sq / o.tokens), progress=False)
    stats, out_ms = [o[0] for o in observed], [o[1] for o in observed]
    widths = [ad.mlp_width(b) for b in ad.blocks(base)]
    cands = []
    for i, b in enumerate(ad.blocks(base)):
        p = neurons.plan(ad, b, stats[i], n_remove=round(0.5 * widths[i]))
        cands.append(p)

    def ours(n_layers):
        cs = [layer_selection.LayerCandidate(i, p, None, out_ms[i]) for i, p in enumerate(cands)]
        chosen = layer_selection.choose(cs, n_layers)
        m = copy.deepcopy(base)
        for c in chosen:
            neurons.apply(m, ad, c.index, c.neurons.keep, c.neurons.weight, c.neurons.bias)
        return m, sum(c.removed_neurons for c in chosen)

    # baselines at the defaults' size
    _, total8 = ours(8) if not args.no_baselines else (None, 0)
    for name, (fn, refit) in ({} if args.no_baselines else BASELINES).items():
        m = apply_removal(base, ad, stats, fn(stats, base, ad, total8), refit)
        row = dict(method=name, params=num_params(m), reduction_pct=100 * (P0 - num_params(m)) / P0, ppl=ppl(m))
        row["ratio"] = row["ppl"] / ppl_src
        rows.append(row)
        print(json.dumps(row), flush=True)
    results["defaults"] = rows

    # ---- size vs perplexity -----------------------------------------------------------------------------
    curve = []
    for n in [int(x) for x in args.curve_layers.split(",") if x]:
        m, total = ours(n)
        point = {"layers": n, "reduction_pct": 100 * (P0 - num_params(m)) / P0,
                 "pyshrink": ppl(m, args.curve_eval_tokens) / ppl_src_curve}
        for name, (fn, refit) in BASELINES.items():
            mb = apply_removal(base, ad, stats, fn(stats, base, ad, total), refit)
            # equal neuron counts; parameter counts differ only by the added down-projection biases (576 each)
            point[name] = ppl(mb, args.curve_eval_tokens) / ppl_src_curve
        curve.append(point)
        print(json.dumps(point), flush=True)
    results["curve"] = curve
    finish(results, args)


def finish(results, args):
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(r) -> str:
    src = r["source"]
    lines = [f"Source SmolLM2-135M: {src['params']:,} params, perplexity {src['ppl']:.3f}.", "",
             "| method | params | fewer params | ppl | ppl / source | contract() wall time (incl. sampling, 512-token eval) |",
             "|---|---|---|---|---|---|"]
    for row in r["defaults"]:
        t = f"{row['wall_s']:.0f} s" if "wall_s" in row else ""
        ppl_cells = (f"{row['ppl']:.3f} | {row['ratio']:.3f}" if row["ppl"] is not None else
                     f"as calibrated (renormalised over kept ids: {row['ppl_renormalised_over_kept_ids']:.3f}) | ")
        lines.append(f"| {row['method']} | {row['params'] / 1e6:.2f} M | {row['reduction_pct']:.1f} % | "
                     f"{ppl_cells} | {t} |")
    lines += ["", "Size vs perplexity (ppl / source on the curve's evaluation tokens):", "",
              "| fewer params | pyshrink | " + " | ".join(BASELINES) + " |",
              "|---|---|" + "---|" * len(BASELINES)]
    for p in r["curve"]:
        lines.append(f"| {p['reduction_pct']:.1f} % | {p['pyshrink']:.3f} | "
                     + " | ".join(f"{p[b]:.3f}" for b in BASELINES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
