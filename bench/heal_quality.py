"""Healing quality on SmolLM2-135M: distillation against plain fine-tuning, iterative against one-shot.

    python bench/heal_quality.py --text ../shared/data/wikitext-2-valid.txt --out bench/out/heal

The WikiText-2 validation text is cut, in tokens, into (from the start) the healing text (whose first
``--calib-tokens`` also calibrate the contraction), ``--track-windows`` held-out windows that the heals
measure to keep their best checkpoint and to stop early, and ``--test-windows`` windows that only this
script measures: every perplexity reported below is on those, which no stage ever saw.

Part A: the source contracted at pyshrink's defaults (with calibration) is healed by distillation for at most
``--minutes`` (stopping once the tracked perplexity reaches the source's, unless ``--until-ppl 0``), then the
same contracted model is fine-tuned with next-token loss alone on the same token budget. Part B (``--part b``):
a model with ~25% fewer parameters made by one-shot contraction + one heal, against iterative schedules
(``--b-variant``: slices, heal-budget split, block pinning, per-slice, continuous or fade-out heal) with the same final size and the same healing
tokens (the slices' heals together visit exactly the windows the one-shot heal visits). ``--ood-windows``
windows of another domain (CPython's pydoc topics) are measured too: healing on WikiText partly adapts the
model to WikiText's format, which the WikiText test windows reward and the other domain does not. Results go
to ``OUT/heal_quality.json`` and ``OUT/heal_quality.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pyshrink import data, models
from pyshrink.evaluate import perplexity
from pyshrink.heal import TeacherCache, heal, iterative_contract
from pyshrink.heal.report import plot_curve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fisher_rank import fisher_ranked  # noqa: E402


def own_contract(source, *, contraction_ratio, num_layers_to_contract, calibration=None, **_):
    """Fallback student when pyshrink.contract is not available: drop the lowest-norm MLP neurons of the
    middle blocks (data-free, no compensation). Used only if ``--contract own`` or contract is missing."""
    from pyshrink.arch import adapter_for
    from pyshrink.arch.linears import keep_inputs, keep_outputs, weight_out_in

    model, tok = source if isinstance(source, tuple) else models.load_model(source)
    model = copy.deepcopy(model)
    ad = adapter_for(model)
    blocks = ad.blocks(model)
    first = (len(blocks) - num_layers_to_contract) // 2
    for b in list(blocks)[first:first + num_layers_to_contract]:
        ins, down = ad.mlp_in_modules(b), ad.mlp_out_module(b)
        score = sum(weight_out_in(m).norm(dim=1) for m in ins) * weight_out_in(down).norm(dim=0)
        keep = score.topk(round(len(score) * (1 - contraction_ratio))).indices.sort().values
        for m in ins:
            keep_outputs(m, keep)
        keep_inputs(down, keep)
    return SimpleNamespace(model=model, tokenizer=tok)


def pin_layers(spec: str, one_shot: list) -> list | None:
    """--b-variant pin=: ``one-shot`` (one-shot's blocks), ``first`` (None: slice 1 chooses) or ``1-7+11-27``."""
    if spec in ("one-shot", "first"):
        return list(one_shot) if spec == "one-shot" else None
    blocks = []
    for part in spec.split("+"):
        lo, _, hi = part.partition("-")
        blocks += list(range(int(lo), int(hi or lo) + 1))
    return blocks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--text", default="../shared/data/wikitext-2-valid.txt")
    ap.add_argument("--out", default="bench/out/heal")
    ap.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    ap.add_argument("--contract", choices=["pyshrink", "own"], default="pyshrink")
    ap.add_argument("--minutes", type=float, default=15.0, help="time cap of the distillation heal (part A)")
    ap.add_argument("--tokens", type=int, default=400_000, help="token cap of the distillation heal (part A)")
    ap.add_argument("--b-tokens", type=int, default=12_288, help="healing tokens of each part-B model")
    ap.add_argument("--b-ratio", type=float, default=0.53)
    ap.add_argument("--b-layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=2, help="slices of the iterative arm when no --b-variant is given")
    ap.add_argument("--b-variant", action="append", default=None, metavar="SPEC",
                    help="an iterative arm of part B (repeatable): comma-separated key=value, keys steps (K), "
                    "split (K colon-separated heal-budget weights, 0 = no heal after that slice; default equal), "
                    "pin (one-shot: every slice narrows the blocks one-shot contraction chose; first: the blocks "
                    "slice 1 chooses, the library's default; or blocks such as 1-7+11-27), heal (per-slice: a heal after each slice, the library's "
                    "default; continuous: one heal, one learning-rate schedule and optimizer across the slices, "
                    "which are cut after the cumulative shares of split; fade: as continuous, but each slice's "
                    "neurons fade out over its share and are cut at factor 0), fade (with heal=fade: the part of "
                    "the last slice's share spent fading, default 0.5), refit (contraction's compensation for this "
                    "arm: lstsq, the default, mean or none), slices (ratio: every slice narrows every block a "
                    "little, the default; blocks: each slice narrows its own group of blocks by the whole ratio, "
                    "deepest group first; blocks-shallow-first: the same, shallowest first), rank (fluctuation: "
                    "contraction's own neuron ranking, the default; fisher: loss-gradient scores + fluctuation on the "
                    "model each slice cuts, see fisher_rank.py; needs pinned blocks). "
                    "Example: steps=3,split=1:1:2,heal=continuous")
    ap.add_argument("--b-no-one-shot-heal", action="store_true", help="part B: contract one-shot (for its size "
                    "and blocks) but skip its heal, to run more iterative arms in one go")
    ap.add_argument("--calib-tokens", type=int, default=36_864, help="calibration text handed to contract (it "
                    "holds out 10%% of it for its own report)")
    ap.add_argument("--calibration-tokens", type=int, default=32_768, help="contract's calibration_tokens "
                    "(its default); part B uses --b-calibration-tokens")
    ap.add_argument("--b-calibration-tokens", type=int, default=8192)
    ap.add_argument("--track-windows", type=int, default=4)
    ap.add_argument("--ood-windows", type=int, default=4, help="windows of another domain (CPython's pydoc topics, "
                    "never trained on) also measured for every model: what healing on WikiText does elsewhere")
    ap.add_argument("--until-ppl", type=float, default=None, help="part A distillation's early stop on the tracked "
                    "windows (default: the source's perplexity there; 0: no early stop)")
    ap.add_argument("--test-windows", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--trainable", default="contracted")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="order in which every heal visits the healing windows")
    ap.add_argument("--threads", default="auto", help="torch threads; auto = 1 when the machine is busier than "
                    "its cores (oversubscribed OpenMP threads are far slower), else all cores")
    args = ap.parse_args(argv)

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    threads = (1 if load > cores else cores) if args.threads == "auto" else int(args.threads)
    torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.contract == "own":
        contract_fn, a_kw, b_kw = own_contract, {}, {}
    else:
        from pyshrink.contract import contract as contract_fn  # takes layers=, so slices are pinned
        # contract's own before/after report is not used here: one window keeps it cheap
        a_kw = dict(calibration_tokens=args.calibration_tokens, eval_tokens=512, progress=False)
        b_kw = dict(calibration_tokens=args.b_calibration_tokens, eval_tokens=512, progress=False)
    env = {"cpu": platform.processor() or platform.machine(), "cores": cores, "load_avg_at_start": round(load, 2),
           "threads": threads, "torch": torch.__version__, "contract": args.contract}
    print(f"environment: {env}", flush=True)

    teacher, tok = models.load_model(args.source)
    ids = data.tokenize(tok, data.read_texts(args.text))
    w = 512
    n_test, n_track = args.test_windows * w, args.track_windows * w
    test = ids[-n_test:]
    track = ids[-(n_test + n_track):-n_test]
    heal_ids = ids[:-(n_test + n_track)]
    calibration = tok.decode(heal_ids[:args.calib_tokens])
    print(f"tokens: {ids.numel():,} = heal {heal_ids.numel():,} (first {args.calib_tokens:,} also calibrate) + "
          f"tracked {n_track:,} + test {n_test:,}", flush=True)

    ood = None
    if args.ood_windows:
        ood = data.tokenize(tok, data.builtin_text("pydoc"))[:args.ood_windows * w]

    def ppl(model):
        return perplexity(model, ids=test, seq_len=w, progress=False)

    def ppl_ood(model):
        return None if ood is None else perplexity(model, ids=ood, seq_len=w, progress=False)

    results = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "environment": env,
               "settings": vars(args)}
    t0 = time.perf_counter()
    results["source"] = {"params": models.num_params(teacher), "ppl": ppl(teacher), "ppl_ood": ppl_ood(teacher)}
    print(f"source: {results['source']}", flush=True)
    cache = TeacherCache(args.topk) if args.topk else None
    common = dict(seed=args.seed, lr=args.lr, temperature=args.temperature, trainable=args.trainable,
                  grad_accum=args.grad_accum, eval_text=track, eval_tokens=n_track, eval_every=args.eval_every,
                  teacher_cache=cache, progress=False)

    def record(name, result, model, **extra):
        entry = {"params": models.num_params(model), "ppl": ppl(model), "ppl_ood": ppl_ood(model),
                 "tokens": result.tokens_seen,
                 "heal_seconds": result.seconds, "train_tokens_per_s": result.train_tokens_per_s,
                 "stopped": result.stopped, "tracked_ppl_initial": result.ppl_initial,
                 "tracked_ppl_best": result.ppl_best, "tracked_ppl_teacher": result.ppl_teacher,
                 "curve": result.curve, **extra}
        entry["ppl_ratio_to_source"] = entry["ppl"] / results["source"]["ppl"]
        if entry["ppl_ood"] is not None:
            entry["ppl_ood_ratio_to_source"] = entry["ppl_ood"] / results["source"]["ppl_ood"]
        results[name] = entry
        print(f"{name}: " + json.dumps({k: v for k, v in entry.items() if k != "curve"}, default=str), flush=True)
        (out / "heal_quality.json").write_text(json.dumps(results, indent=2, default=str))

    if "a" in args.part:
        t = time.perf_counter()
        c = contract_fn(args.source, calibration=calibration, **a_kw)
        results["contracted"] = {"params": models.num_params(c.model), "ppl": ppl(c.model), "ppl_ood": ppl_ood(c.model),
                                 "contract_seconds": round(time.perf_counter() - t, 1),
                                 "layers": [row["layer"] for row in getattr(c, "summary", {}).get("layers", [])]}
        print(f"contracted: {results['contracted']}", flush=True)
        plain_student = copy.deepcopy(c.model)
        r = heal((c.model, tok), (teacher, tok), heal_ids, tokens=args.tokens, max_seconds=60 * args.minutes,
                 alpha=args.alpha, until_ppl=args.until_ppl, **common)
        record("distilled", r, r.model)
        r2 = heal((plain_student, tok), (teacher, tok), heal_ids, tokens=r.tokens_seen, alpha=0.0, until_ppl=0,
                  **common)
        record("fine_tuned", r2, r2.model, note="next-token loss only, same token budget, no early stop")
        plot_curve(out / "heal_quality.png", {"distillation": r.curve, "next-token fine-tuning": r2.curve},
                   reference={"source": r.ppl_teacher}, title="SmolLM2-135M contracted at defaults: recovery "
                   "(tracked windows)")
        del plain_student, c, r, r2

    if "b" in args.part:
        kw = dict(contraction_ratio=args.b_ratio, num_layers_to_contract=args.b_layers, calibration=calibration)
        t = time.perf_counter()
        one = contract_fn(args.source, **kw, **b_kw)
        results["b_one_shot_contracted"] = {
            "params": models.num_params(one.model), "ppl": ppl(one.model), "ppl_ood": ppl_ood(one.model),
            "contract_seconds": round(time.perf_counter() - t, 1),
            "layers": [row["layer"] for row in getattr(one, "summary", {}).get("layers", [])]}
        print(f"b_one_shot_contracted: {results['b_one_shot_contracted']}", flush=True)
        if not args.b_no_one_shot_heal:
            r = heal((one.model, tok), (teacher, tok), heal_ids, tokens=args.b_tokens, alpha=args.alpha, until_ppl=0,
                     **common)
            record("b_one_shot_healed", r, r.model)
            del r
        del one
        for spec in args.b_variant or [f"steps={args.steps}"]:
            v = dict(kv.split("=", 1) for kv in spec.split(","))
            unknown = set(v) - {"steps", "split", "pin", "heal", "fade", "refit", "slices", "rank"}
            if unknown:
                ap.error(f"--b-variant {spec!r}: unknown key(s) {', '.join(sorted(unknown))}")
            steps = int(v.get("steps", args.steps))
            split = [float(x) for x in v["split"].split(":")] if "split" in v else None
            pinned = pin_layers(v.get("pin", "first"), results["b_one_shot_contracted"]["layers"])
            rank = v.get("rank", "fluctuation")
            fisher_ok = pinned is not None and args.contract != "own"
            if rank not in ("fluctuation", "fisher") or (rank == "fisher" and not fisher_ok):
                ap.error(f"--b-variant {spec!r}: rank must be fluctuation or fisher (fisher with pinned blocks and "
                         "pyshrink's contraction)")
            t = time.perf_counter()
            it = iterative_contract(args.source, steps=steps, heal_tokens=args.b_tokens, heal_text=heal_ids,
                                    teacher=(teacher, tok),
                                    contract_fn=fisher_ranked(contract_fn) if rank == "fisher" else contract_fn,
                                    contract_kwargs={**b_kw, **({"refit": v["refit"]} if "refit" in v else {})},
                                    alpha=args.alpha, until_ppl=0, heal_split=split, layers=pinned,
                                    heal_schedule=v.get("heal", "per-slice"),
                                    fade_share=float(v["fade"]) if "fade" in v else None,
                                    slices=v.get("slices", "ratio"), **kw, **common)
            name = "b_iterative_" + spec.replace("=", "").replace(",", "_").replace(":", "-")
            entry = {"spec": spec, "params": it.num_params, "ppl": ppl(it.model), "ppl_ood": ppl_ood(it.model),
                     "steps": it.steps, "seconds": round(time.perf_counter() - t, 1)}
            entry["ppl_ratio_to_source"] = entry["ppl"] / results["source"]["ppl"]
            if entry["ppl_ood"] is not None:
                entry["ppl_ood_ratio_to_source"] = entry["ppl_ood"] / results["source"]["ppl_ood"]
            results[name] = entry
            print(f"{name}: {json.dumps(entry, default=str)}", flush=True)
            (out / "heal_quality.json").write_text(json.dumps(results, indent=2, default=str))
            del it

    results["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if cache is not None:
        results["teacher_cache"] = {"k": cache.k, "hits": cache.hits, "misses": cache.misses}
    (out / "heal_quality.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out / 'heal_quality.json'} in {results['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
