"""Peak memory of ``pyshrink quantize`` (or ``contract``) with and without ``--stream`` on one model, in one run.

    python bench/stream_memory.py --work /tmp/stream_mem [--stage quantize|contract]
                                  [--source FOLDER | --hidden 2048 --intermediate 5632 --layers 16 --vocab 32000]
                                  [--eval-tokens 512] [--seq-len 256] [--calibration TEXT [--calibration-tokens 16384]]

The source is a Llama-architecture model of the given size with random weights, written once, block by block, in
bfloat16 safetensors under WORK (a model whose weights, not its activations, dominate the memory; no model hub
here), or --source, a folder of your own. A model whose float32 copy would not fit in 80 % of this machine's
memory is run with --stream only. Each mode runs ``pyshrink quantize`` (4-bit, group 128; method rtn, or auto with
--calibration) or ``pyshrink contract`` (the defaults: 8 blocks at ratio 0.5, calibrated on --calibration, which it
needs; --seq-len does not apply) in its own process, and
a sampler reads the process's /proc/PID/status every 20 ms: peak resident memory (VmRSS) and its anonymous part
(RssAnon: what the process allocated; the rest is file pages, such as the memory-mapped source, which the kernel
can drop and read again). Prints a Markdown table, checks that both output folders hold the same tensors and the
same before/after perplexity, and writes WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def byte_tokenizer():
    """A byte-level BPE without merges: 256 ids, no files needed; the model's larger vocabulary is never indexed past
    them, which does not matter for memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def make_source(path: Path, args) -> None:
    """A random Llama of the asked size, written one block at a time (it may be larger than memory too): normal
    weights of std 0.02 (the same draw in every block), norms at 1, in bfloat16, sharded as save_pretrained
    shards."""
    import torch
    import transformers as tf
    from accelerate import init_empty_weights

    from pyshrink.streaming import ShardWriter

    if (path / "config.json").exists():
        return
    config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                            num_key_value_heads=max(1, args.hidden // 512), vocab_size=args.vocab,
                            max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                            architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        shapes = {k: v.shape for k, v in tf.LlamaForCausalLM(config).state_dict().items()}
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(tmp, args.layers + 1)
    gen = torch.Generator().manual_seed(0)

    def tensor(key, shape):
        if len(shape) == 1:  # norms
            return torch.ones(shape, dtype=torch.bfloat16)
        return (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)

    # one random draw for every block: drawing a 13 B-parameter model's normals took most of an hour here, and the
    # numbers this measures (memory, equal folders) do not depend on the blocks differing
    first = {k[len("model.layers.0."):]: tensor(k, v) for k, v in shapes.items() if k.startswith("model.layers.0.")}
    for i in range(args.layers):
        writer.write({f"model.layers.{i}.{k}": t for k, t in first.items()})
    writer.write({k: tensor(k, v) for k, v in shapes.items() if not k.startswith("model.layers.")})
    writer.finish()
    config.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    tmp.rename(path)


def ram_bytes() -> int:
    return int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list) -> dict:
    """Run ``cmd``; its peak VmRSS / RssAnon (sampled every 20 ms), wall time and the JSON summary it prints."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0}

    def sample():
        while proc.poll() is None:
            s = _status(proc.pid)
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak["VmRSS"], "peak_anon": peak["RssAnon"],
            "summary": json.loads(out[out.index("{"):])}  # the JSON the command prints (on one line or indented)


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from pyshrink.models import read_state_dict

    sa, sb = read_state_dict(a), read_state_dict(b)
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--stage", choices=("quantize", "contract"), default="quantize")
    ap.add_argument("--source", type=Path, help="a model folder (.safetensors) instead of a random Llama")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calibration", type=Path, help="calibration text (method auto); default: rtn without data")
    ap.add_argument("--calibration-tokens", type=int, default=16384, help="calibration tokens used at most")
    args = ap.parse_args()
    if args.stage == "contract" and not args.calibration:
        ap.error("--stage contract needs --calibration (a streamed decoder calibrates on text, not on its own samples)")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.source:
        src = args.source
    else:
        src = args.work / f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-bf16"
        make_source(src, args)
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    stored = __import__("pyshrink.models", fromlist=["stored_float_dtype"]).stored_float_dtype(src)
    rows = {}
    params = src_bytes // (stored.itemsize if stored is not None else 4)  # the headers' few kilobytes aside
    modes = ["in memory", "--stream"]
    if 4 * params > 0.8 * ram_bytes():  # the in-memory run holds the model in float32 at least once
        print(f"in memory: not run, the model takes {4 * params / 2**30:.1f} GiB in float32 and this machine has "
              f"{ram_bytes() / 2**30:.1f} GiB", file=sys.stderr)
        modes.remove("in memory")
    before_key, after_key = ("before", "after") if args.stage == "quantize" else ("ppl_source", "ppl_final")
    for mode in modes:
        out = args.work / (f"{args.stage[0]}-stream" if mode == "--stream" else f"{args.stage[0]}-memory")
        cmd = [sys.executable, "-m", "pyshrink", args.stage, str(src), "-o", str(out), "--overwrite",
               "--eval-tokens", str(args.eval_tokens), "--json"]
        if args.stage == "quantize":
            cmd += ["--group-size", "128", "--seq-len", str(args.seq_len)]
            cmd += (["--calibration", str(args.calibration), "--calibration-tokens", str(args.calibration_tokens)]
                    if args.calibration else ["--method", "rtn"])
        else:
            cmd += ["--calibration", str(args.calibration), "--calibration-tokens", str(args.calibration_tokens)]
        if mode == "--stream":
            cmd.append("--stream")
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", file=sys.stderr, flush=True)
        rows[mode] = measure(cmd)
        rows[mode]["out_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    pair = [args.work / f"{args.stage[0]}-{m}" for m in ("memory", "stream")]
    same = same_tensors(*pair) if "in memory" in rows else None
    print(f"\nsource: {src.name}, {src_bytes / 2**30:.2f} GiB of {str(stored).split('.')[-1]} safetensors "
          f"({params / 1e6:,.0f} M parameters; float32 in memory: {4 * params / 2**30:.2f} GiB); pyshrink {args.stage}\n")
    print("| mode | peak RSS (GiB) | peak anonymous (GiB) | wall (s) | ppl before | ppl after | output (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        s = r["summary"]
        print(f"| {mode} | {r['peak_rss'] / 2**30:.2f} | {r['peak_anon'] / 2**30:.2f} | {r['seconds']:.0f} | "
              f"{s[before_key]:.3f} | {s[after_key]:.3f} | {r['out_bytes'] / 2**30:.2f} |")
    if same is not None:
        a, b = rows["in memory"]["summary"], rows["--stream"]["summary"]
        print(f"\nsame tensors in both folders: {same}; same before/after: "
              f"{(a[before_key], a[after_key]) == (b[before_key], b[after_key])}")
    print(f"machine memory: {ram_bytes() / 2**30:.1f} GiB")
    (args.work / "results.json").write_text(json.dumps({"source": str(src), "source_bytes": src_bytes, "rows": rows,
                                                        "same_tensors": same}, indent=2))


if __name__ == "__main__":
    main()
