"""One latency measurement, run inside a fresh process (see :mod:`.worker`) so that peak memory is its own.

Each runtime is a small class registered in :data:`RUNNERS` with ``load()``, ``prefill(ids) -> token`` and
``decode(token) -> token`` (greedy); :func:`measure` runs the same protocol on every one of them:
warm-up, then ``repeats`` x (prefill of the prompt, then ``new_tokens`` single-token steps), each timed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

RUNNERS: dict = {}
# Encoders (BERT: sentence embeddings) have no generation: one forward pass over the prompt is what a request
# costs, so they are timed as that (``forward(ids)``), with no decode steps.
ENCODER_RUNNERS: dict = {}


def runner(name: str, registry: dict = RUNNERS):
    def deco(cls):
        cls.name = name
        registry[name] = cls
        return cls
    return deco


def disk_size(path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    pats = ("*.onnx", "*.onnx.data", "*.safetensors", "*.gguf", "*.bin")
    return sum(f.stat().st_size for pat in pats for f in p.glob(pat) if f.is_file())


@runner("torch")
class TorchRunner:
    """A pyshrink/transformers model in PyTorch with transformers' KV cache (LM head on the last position only).

    With ``compile`` given (True or False) or ``fuse`` the model runs through
    :class:`pyshrink.runtime.torch_decoder.TorchDecoder` instead (static KV cache; ``fuse``: q|k|v and gate|up
    as one projection each, ``"auto"`` where the architecture's adapter can fuse them; ``compile``: the step
    through ``torch.compile``, whose compilation happens in the warm-up and is reported as ``compile_s``;
    ``cpp_wrapper``: inductor's C++ wrapper; ``torch_threads``: torch's threads during the prompt and each step,
    TorchDecoder's ``torch_threads``).
    """

    def __init__(self, model: str, threads: int | None, capacity: int, *, compile: bool | None = None,
                 fuse: bool | str = False, cpp_wrapper: bool = False, torch_threads: int | None = None):
        self.source, self.threads, self.capacity = model, threads, capacity
        options = {"cpp_wrapper": True} if cpp_wrapper else None
        # compile=False without fuse: the static cache alone (for measuring each part on its own)
        self.decoder_kw = (dict(compile=bool(compile), fuse=fuse, compile_options=options, threads=threads,
                                torch_threads=torch_threads)
                           if compile is not None or fuse else None)
        if cpp_wrapper and not compile:
            raise ValueError("cpp_wrapper applies to compile=True only")

    def load(self):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        from ..models import load_model

        from ..models import CACHE_DIR, EMBEDDED

        self.torch = torch
        self.model = load_model(self.source, with_tokenizer=False)
        if str(self.source) in EMBEDDED:
            self.disk_path = CACHE_DIR / str(self.source)
        self.vocab = self.model.get_output_embeddings().out_features if hasattr(
            self.model.get_output_embeddings(), "out_features") else self.model.config.vocab_size
        self.decoder = None
        if self.decoder_kw is not None:
            from ..arch import adapter_for
            from ..runtime.torch_decoder import TorchDecoder

            kw = dict(self.decoder_kw)
            if kw["fuse"] == "auto":  # GPT-2, OPT, Phi: pyshrink has no fused projections for them
                kw["fuse"] = adapter_for(self.model).fuse is not None
            self.decoder = TorchDecoder(self.model, self.capacity + 1, **kw)
            self.compile_s = 0.0

    def _run(self, ids, past):
        from ..kv_cache import cache_inputs, returned_cache

        kw = {"use_cache": True, **cache_inputs(self.model, past)}
        try:
            out = self.model(ids, logits_to_keep=1, **kw)
        except TypeError:
            out = self.model(ids, **kw)
        return int(out.logits[0, -1].argmax()), returned_cache(out)

    def prefill(self, ids):
        if self.decoder is not None:
            return int(self.decoder.prefill(ids).argmax())
        with self.torch.inference_mode():
            tok, self.past = self._run(self.torch.tensor([ids]), None)
        return tok

    def decode(self, tok):
        if self.decoder is not None:
            if self.decoder_kw["compile"] and not self.compile_s:  # the first step compiles
                t = time.perf_counter()
                out = int(self.decoder.step(tok).argmax())
                self.compile_s = time.perf_counter() - t
                return out
            return int(self.decoder.step(tok).argmax())
        with self.torch.inference_mode():
            tok, self.past = self._run(self.torch.tensor([[tok]]), self.past)
        return tok


@runner("onnxruntime")
class OrtRunner:
    """A ``pyshrink export`` folder through :class:`pyshrink.runtime.DecoderSession` (shared KV buffers)."""

    def __init__(self, model: str, threads: int | None, capacity: int):
        self.folder, self.threads, self.capacity = model, threads, capacity

    def load(self):
        from ..runtime.session import DecoderSession

        self.sess = DecoderSession(self.folder, threads=self.threads)
        self.vocab = int(self.sess.meta["vocab_size"])

    def prefill(self, ids):
        self.state = self.sess.new_state(self.capacity)
        return int(self.sess.step(self.state, ids).argmax())

    def decode(self, tok):
        return int(self.sess.step(self.state, [tok]).argmax())


@runner("ort-genai")
class GenaiRunner:
    """A folder with ``genai_config.json`` (ONNX Runtime GenAI's model builder, or a pyshrink export) through
    GenAI's own C++ generator (greedy)."""

    def __init__(self, model: str, threads: int | None, capacity: int):
        self.folder, self.threads, self.capacity = Path(model), threads, capacity

    def load(self):
        import json
        import tempfile

        import onnxruntime_genai as og

        folder = self.folder
        if self.threads:  # GenAI reads thread counts from genai_config.json: a linked copy with the setting
            tmp = Path(tempfile.mkdtemp(prefix="pyshrink-genai-"))
            for f in folder.iterdir():
                if f.name != "genai_config.json":
                    os.symlink(f.resolve(), tmp / f.name)
            cfg = json.loads((folder / "genai_config.json").read_text())
            cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = int(self.threads)
            cfg["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
            (tmp / "genai_config.json").write_text(json.dumps(cfg))
            folder = tmp
        self.og = og
        self.model = og.Model(str(folder))
        self.vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.capacity, do_sample=False)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(np.asarray([ids], dtype=np.int32))
        return self._next()

    def _next(self):
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def decode(self, tok):
        return self._next()


@runner("llama.cpp")
class LlamaCppRunner:
    """A GGUF file through llama-cpp-python (greedy on the returned logits)."""

    def __init__(self, model: str, threads: int | None, capacity: int):
        self.path, self.threads, self.capacity = model, threads, capacity

    def load(self):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(self.path), n_ctx=self.capacity + 8, n_batch=512, n_ubatch=512,
                         n_threads=self.threads or os.cpu_count(), n_threads_batch=self.threads or os.cpu_count(),
                         logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()

    def _argmax(self):
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))  # the last position's logits

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._argmax()

    def decode(self, tok):
        self.llm.eval([tok])
        return self._argmax()


@runner("torch", ENCODER_RUNNERS)
class TorchEncoderRunner:
    """An encoder in PyTorch: its base model's last hidden states for the prompt."""

    def __init__(self, model: str, threads: int | None):
        self.source, self.threads = model, threads

    def load(self):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        from ..models import load_model

        self.torch = torch
        model = load_model(self.source, with_tokenizer=False)
        self.model = getattr(model, "base_model", model)  # a task head is not part of the embedding
        self.vocab = self.model.config.vocab_size

    def forward(self, ids):
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([ids])).last_hidden_state


@runner("onnxruntime", ENCODER_RUNNERS)
class OrtEncoderRunner:
    """An exported encoder folder in ONNX Runtime (the inputs its pyshrink_onnx.json names)."""

    def __init__(self, model: str, threads: int | None):
        self.folder, self.threads = Path(model), threads

    def load(self):
        from ..errors import ModelLoadError
        from ..runtime.session import open_session, read_meta

        self.meta = read_meta(self.folder)
        path = self.folder / self.meta["model_file"]
        self.sess = open_session(str(path), path, threads=self.threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        vocab = self.meta.get("vocab_size")  # exports before 2026-11-24 lack it: their tokenizer's size, then
        if vocab is None and (self.folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(self.folder / "tokenizer.json")).get_vocab_size()
        if not vocab:
            raise ModelLoadError(f"{self.folder} records no vocabulary size and has no tokenizer.json: export it again")
        self.vocab = int(vocab)

    def forward(self, ids):
        x = np.asarray([ids], dtype=np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        return self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]


def model_facts(model) -> tuple[str | None, int | None]:
    """(kind: "encoder" or "decoder", positions) from an export's pyshrink_onnx.json or a model folder's
    config.json, without loading the model; (None, None) for other sources (GGUF files, embedded names and hub
    ids, which pyshrink loads as decoders)."""
    import json

    from ..errors import ModelLoadError
    from ..runtime.session import META_FILE, read_meta

    p = Path(str(model))
    if (p / META_FILE).is_file():
        meta = read_meta(p)
        return meta.get("kind"), meta.get("max_length")
    if not (p / "config.json").is_file():
        return None, None
    from types import SimpleNamespace

    from ..arch import adapter_for
    from ..models import max_positions

    try:
        config = SimpleNamespace(**json.loads((p / "config.json").read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ModelLoadError(f"cannot read {p / 'config.json'}: {exc}") from exc
    return adapter_for(config).kind, max_positions(config)


def _resources(rss_loaded: int, disk_path) -> dict:
    """The memory, size and machine-load fields every row has."""
    return {
        # every *_mb is 10^6 bytes (memory was in MiB until 2026-11-24 while disk was in MB, both labelled MB)
        "peak_rss_mb": peak_rss_bytes() / 1e6, "rss_after_load_mb": rss_loaded / 1e6,
        "disk_mb": disk_size(disk_path) / 1e6,
        "loadavg_1min": round(os.getloadavg()[0], 2),  # other work on the machine while this ran
    }


def measure_encoder(runtime: str, model: str, *, prompt_tokens: int = 128, threads: int | None = None,
                    repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Forward passes over one ``prompt_tokens``-token input: median latency and tokens/s (no decode steps)."""
    import psutil

    if runtime not in ENCODER_RUNNERS:
        raise ValueError(f"runtime {runtime!r} does not run encoders (those that do: {', '.join(ENCODER_RUNNERS)})")
    r = ENCODER_RUNNERS[runtime](model, threads)
    t0 = time.perf_counter()
    r.load()
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    ids = np.random.default_rng(seed).integers(3, min(r.vocab, 32000), size=prompt_tokens).tolist()
    times = []
    for rep in range(warmup + repeats):
        t = time.perf_counter()
        r.forward(ids)
        if rep >= warmup:
            times.append(time.perf_counter() - t)
    return {
        "runtime": runtime, "model": str(model), "kind": "encoder", "prompt_tokens": prompt_tokens, "new_tokens": 0,
        "threads": threads, "repeats": repeats, "load_s": round(load_s, 3),
        "prefill_ms": float(np.median(times) * 1e3), "prefill_ms_all": [round(x * 1e3, 2) for x in times],
        "decode_ms_median": None, "decode_ms_p95": None, "decode_tokens_per_s": None,
        "forward_tokens_per_s": float(prompt_tokens / np.median(times)), **_resources(rss_loaded, model),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size: Linux's VmHWM (ru_maxrss would carry over the parent's peak,
    which Linux keeps across fork and exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    info = psutil.Process().memory_info()
    return int(getattr(info, "peak_wset", 0) or info.rss)


def measure(runtime: str, model: str, *, prompt_tokens: int = 128, new_tokens: int = 64, threads: int | None = None,
            repeats: int = 3, warmup: int = 1, seed: int = 0, options: dict | None = None) -> dict:
    """``options``: keyword arguments of the runtime's runner (the torch runner's ``compile``, ``fuse``...)."""
    import psutil

    if model_facts(model)[0] == "encoder":
        return measure_encoder(runtime, model, prompt_tokens=prompt_tokens, threads=threads, repeats=repeats,
                               warmup=warmup, seed=seed)
    if runtime not in RUNNERS:
        raise ValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNNERS)})")
    r = RUNNERS[runtime](model, threads, prompt_tokens + new_tokens, **(options or {}))
    t0 = time.perf_counter()
    r.load()
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    ids = np.random.default_rng(seed).integers(3, min(r.vocab, 32000), size=prompt_tokens).tolist()
    prefill, steps = [], []
    for rep in range(warmup + repeats):
        t = time.perf_counter()
        tok = r.prefill(ids)
        dt_prefill = time.perf_counter() - t
        dts = []
        for _ in range(new_tokens - 1):  # the prefill produced the first new token
            t = time.perf_counter()
            tok = r.decode(tok)
            dts.append(time.perf_counter() - t)
        if rep >= warmup:
            prefill.append(dt_prefill)
            steps.extend(dts)
    steps_ms = np.asarray(steps) * 1e3
    return {
        "runtime": runtime, "model": str(model), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "threads": threads, "repeats": repeats, "load_s": round(load_s, 3),
        "prefill_ms": float(np.median(prefill) * 1e3), "prefill_ms_all": [round(x * 1e3, 2) for x in prefill],
        "decode_ms_median": float(np.median(steps_ms)), "decode_ms_p95": float(np.percentile(steps_ms, 95)),
        "decode_tokens_per_s": float(1e3 / np.median(steps_ms)),
        **_resources(rss_loaded, getattr(r, "disk_path", model)),
        **({"options": options} if options else {}),
        **({"compile_s": round(r.compile_s, 2)} if getattr(r, "compile_s", None) else {}),
        # what fuse="auto" came to: projection groups run as one call (0: none fused)
        **({"fused_groups": r.decoder.fused_groups} if getattr(r, "decoder", None) is not None else {}),
    }
