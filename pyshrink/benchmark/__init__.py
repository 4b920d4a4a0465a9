"""Latency benchmarks: prefill, per-token decode (median, p95), tokens/s, peak memory and size on disk.
Encoders (BERT) are timed as one forward pass over the prompt per repeat (latency and tokens/s; no decode).

Recipe::

    from pyshrink.benchmark import bench, markdown_table
    rows = bench(["smollm2-135m", "out/smollm2-contracted"], runtime="both", prompt_tokens=128, new_tokens=64)
    print(markdown_table(rows))

Every (model, runtime) pair is measured in a fresh Python process (:mod:`.worker`), so one model's peak
memory never mixes with another's; processes for ONNX Runtime, ORT GenAI and llama.cpp do not even import
torch. Runtimes: ``torch`` (any :func:`pyshrink.load_model` source), ``onnxruntime`` (a ``pyshrink export``
folder), and the peers ``ort-genai`` (a folder with ``genai_config.json``) and ``llama.cpp`` (a .gguf file).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import InvalidSetting, check_range

RUNTIMES = ("torch", "onnxruntime", "both")

_BOOT = r"""
import json, sys
spec = json.loads(sys.argv[1])
if spec["runtime"] != "torch":  # keep torch (and its memory) out of non-PyTorch measurements
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _NoTorch())
from pyshrink.benchmark.worker import main
sys.exit(main(sys.argv[1:]))
"""


def is_onnx_folder(path) -> bool:
    return (Path(path) / "pyshrink_onnx.json").is_file()


def run_one(runtime: str, model, *, prompt_tokens=128, new_tokens=64, threads=None, repeats=3, warmup=1,
            timeout: float = 3600, label: str | None = None, options: dict | None = None) -> dict:
    """Measure ``model`` on ``runtime`` in a fresh subprocess; returns the result row (or one with ``error``).

    ``options`` go to the runtime's runner (torch: ``compile``, ``fuse``, ``cpp_wrapper``; see
    :class:`pyshrink.benchmark.runners.TorchRunner`).
    """
    spec = {"runtime": runtime, "model": str(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "threads": threads, "repeats": repeats, "warmup": warmup, "options": options}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        p = subprocess.run([sys.executable, "-c", _BOOT, json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"error": f"worker exited {p.returncode}: {p.stderr.strip()[-500:]}"}
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout:.0f} s"}
    row.setdefault("runtime", runtime)
    row.setdefault("model", str(model))
    row["label"] = label or Path(str(model)).name
    return row


def bench(models, *, runtime: str = "both", prompt_tokens: int = 128, new_tokens: int = 64, threads: int | None = None,
          repeats: int = 3, warmup: int = 1, int4: bool = False, export_dir=None, progress=None,
          compile: bool = False) -> list[dict]:
    """Benchmark each model on the chosen runtime(s); ``both`` exports non-ONNX models on the fly.

    ``compile``: PyTorch rows decode through :class:`pyshrink.runtime.torch_decoder.TorchDecoder` (static
    KV cache, projections fused where the architecture allows (``fused_groups`` in the row), ``torch.compile``);
    the compilation is timed apart (``compile_s``).
    """
    if runtime not in RUNTIMES:
        raise InvalidSetting(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    check_range("prompt_tokens", prompt_tokens, 1, 1 << 16, integer=True)
    check_range("new_tokens", new_tokens, 2, 1 << 16, integer=True)
    check_range("repeats", repeats, 1, 1000, integer=True)
    if threads is not None:
        check_range("threads", threads, 1, 1024, integer=True)
    kinds = {}
    for m in models:  # every source before any measurement: a typo in the last one fails now, not in an hour
        if not is_onnx_folder(m):
            if runtime == "onnxruntime":
                raise InvalidSetting(f"{m} is not a `pyshrink export` folder: export it first, or use --runtime both")
        elif runtime == "torch":
            raise InvalidSetting(f"{m} is an exported ONNX folder: benchmark it with --runtime onnxruntime")
        kinds[m] = _check_lengths(m, prompt_tokens, new_tokens)
    names = _labels(models)
    rows = []
    kw = dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads, repeats=repeats, warmup=warmup)
    tmp = None
    try:
        for m in models:
            onnx_folder = is_onnx_folder(m)
            jobs = []
            if runtime in ("torch", "both") and not onnx_folder:
                jobs.append(("torch", m, names[m]))
            if runtime in ("onnxruntime", "both"):
                if onnx_folder:
                    jobs.append(("onnxruntime", m, names[m]))
                else:
                    if export_dir is None and tmp is None:
                        tmp = tempfile.TemporaryDirectory(prefix="pyshrink-bench-")
                    base = Path(export_dir) if export_dir is not None else Path(tmp.name)
                    out = _export_for(m, base, int4, progress)
                    jobs.append(("onnxruntime", out, names[m] + (" (int4)" if int4 else "")))
            for rt, path, label in jobs:
                if progress:
                    progress(f"measuring {path} on {rt}")
                # an encoder's forward is timed as it is (TorchDecoder compiles decoders' steps)
                decoder_torch = rt == "torch" and kinds[m] == "decoder"
                opts = {"compile": True, "fuse": "auto"} if compile and decoder_torch else None
                if opts:
                    label = label + " (compiled)"
                rows.append(run_one(rt, path, label=label, options=opts, **kw))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows


def _labels(models) -> dict:
    """Each model's row label: its folder or file name, or the path as given where two names are the same
    (``va/final`` and ``vb/final`` must not both read ``final``)."""
    names = [Path(str(m)).name for m in models]
    return {m: n if names.count(n) == 1 else str(m) for m, n in zip(models, names)}


def _check_lengths(model, prompt_tokens: int, new_tokens: int) -> str:
    """The model's kind ("encoder", "decoder"), where its config or export says so without loading it; a prompt (and,
    for a decoder, new tokens) beyond the model's positions is refused before any export or measurement."""
    from .runners import model_facts

    if not is_onnx_folder(model):
        from ..models import resolve

        resolve(model)  # a missing folder or .gguf file (a hub id is only tried when it is loaded)
    kind, limit = model_facts(model)
    if kind == "encoder":  # one forward pass over the prompt: no new tokens
        if limit and prompt_tokens > limit:
            raise InvalidSetting(f"prompt_tokens = {prompt_tokens} is more than the {limit} positions of the encoder "
                                 f"{model}: use a shorter prompt")
        return kind
    total = prompt_tokens + new_tokens
    if limit and total - 1 > limit:  # the last new token is never fed back
        raise InvalidSetting(f"prompt_tokens + new_tokens = {total} feeds {total - 1} positions, more than the "
                             f"{limit} of {model}: use a shorter prompt or fewer new tokens")
    return kind or "decoder"


def _source_stamp(model) -> str:
    """What identifies a model source for reusing its export: its resolved path and every file's size and
    modification time (as make does; hashing the bytes would cost as much as a read of the whole model), or the
    name of an embedded model."""
    p = Path(str(model)).expanduser()
    if not p.exists():
        return str(model)
    p = p.resolve()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    rows = [f"{f.relative_to(p) if f != p else f.name} {f.stat().st_size} {f.stat().st_mtime_ns}" for f in files]
    return "\n".join([str(p)] + rows)


def _export_for(model, base: Path, int4: bool, progress) -> Path:
    """The ONNX export of ``model`` under ``base``: made now, unless one of this very source is already there. The
    folder name carries a digest of :func:`_source_stamp`, so two models with the same folder name (runs/v1/final,
    runs/v2/final) or a model changed since its last export never share one."""
    from ..export import export_onnx

    key = hashlib.sha256(_source_stamp(model).encode()).hexdigest()[:12]
    out = base / f"{Path(str(model)).name}-{key}{'-int4' if int4 else ''}-onnx"
    if not is_onnx_folder(out):
        if progress:
            progress(f"exporting {model} -> {out}")
        export_onnx(model, out, int4=int4, overwrite=True)
    return out


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | runtime | prefill ms | decode ms/token (median) | p95 | tokens/s | peak RSS MB | disk MB |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('label', r['model'])} | {r['runtime']} | error: {r['error'][:120]} | | | | | |")
            continue
        if r.get("kind") == "encoder":  # one forward pass: its time in "prefill", its tokens/s marked as forward
            lines.append(f"| {r.get('label', r['model'])} | {r['runtime']} | {r['prefill_ms']:.1f} | - | - "
                         f"| {r['forward_tokens_per_s']:.1f} (forward) | {r['peak_rss_mb']:.0f} | {r['disk_mb']:.1f} |")
            continue
        lines.append(f"| {r.get('label', r['model'])} | {r['runtime']} | {r['prefill_ms']:.1f} | {r['decode_ms_median']:.2f} "
                     f"| {r['decode_ms_p95']:.2f} | {r['decode_tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} "
                     f"| {r['disk_mb']:.1f} |")
    return "\n".join(lines)


def chart_formats() -> set | None:
    """The file suffixes :func:`chart` can write (``png``, ``svg``, ``pdf`` ...), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return set(Figure().canvas.get_supported_filetypes())


def chart(rows: list[dict], path) -> Path | None:
    """Bar charts of decode tokens/s and prefill latency; None (nothing written) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "error" not in r]
    labels = [f"{r.get('label', r['model'])}\n{r['runtime']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok) * 2), 4.5))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "tokens/s: decode, or an encoder's forward (higher is better)"),
                           (axes[1], "prefill_ms", "prefill (encoders: forward) latency, ms (lower is better)")):
        vals = [r[key] if r.get(key) is not None else r.get("forward_tokens_per_s", 0.0) for r in ok]
        bars = ax.bar(range(len(ok)), vals, color=[f"C{i % 10}" for i in range(len(ok))])
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
        ax.set_title(title)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    if ok:
        fig.suptitle(f"batch 1, {ok[0]['prompt_tokens']}-token prompt, {ok[0]['new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


__all__ = ["bench", "run_one", "markdown_table", "chart", "RUNTIMES", "is_onnx_folder"]
