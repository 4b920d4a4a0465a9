"""Batch-1 greedy/sampled decoding of a PyTorch causal LM (float or pyshrink-quantized) with less overhead
per token than transformers' eager loop: a static KV cache, q|k|v and gate|up as one projection each, and
the one-token step compiled by ``torch.compile`` (inductor; pyshrink's ops are extern calls in the graph).

Recipe::

    import pyshrink
    from pyshrink.runtime.torch_decoder import TorchDecoder

    model, tok = pyshrink.load_model("out/smollm2-q4")
    dec = TorchDecoder(model, max_length=256)     # compiles on the first step (tens of seconds; cached on disk)
    logits = dec.prefill(tok("The capital of France is").input_ids)   # float32 [vocab], last position
    for _ in range(20):
        logits = dec.step(int(logits.argmax()))

Why each part (SmolLM2-135M, 2 threads, bench/RESULTS.md "Decode speed"): transformers' eager step spends
about as long in ~1,700 small operators and Python as in the 4-bit linears; inductor fuses the small ones
into a few C++ loops, which needs fixed shapes (the static cache); fusing projections saves 3 op calls per
block. The prompt runs eagerly (its length varies; compiling it would recompile per length).

Threads: a quantized model's one-token step runs pyshrink's kernels on ``threads`` threads and torch's
operators on one (``torch_threads``). At one token, torch's operators (norms, rotary, attention over the
cache) are too small to gain from a second thread, while its OpenMP workers keep spinning after each of them
on the cores that the kernels' own pool (whose workers also spin briefly between calls, so that each of a
step's ~120 small calls gets both cores without a wake-up) needs; with both pools on two threads the step
measured 13.0 ms against 9.8 ms split this way (SmolLM2-135M q4-g64, 4-bit head; bench/RESULTS.md, Decode
speed, the ablation run). Inductor compiles the step for the thread count it runs with. The prompt runs
with the same split: its torch operators are large enough to start OpenMP regions, and the workers spinning
after each of them took a core from the kernels' pool, which made the quantized GEMMs about 2x slower
(development measurement, SmolLM2-135M q4-g64, 2 threads, prompts of 64 / 256 / 1,024 tokens: 199 / 702 /
2,510 ms with torch on two threads, 118 / 447 / 2,457 ms on one; bench/RESULTS.md has the committed effect).

The model is changed in place by ``fuse=True`` (see :attr:`pyshrink.arch.Adapter.fuse`): it computes the same
numbers, its state dict, ``pyshrink.save`` and the ONNX export are unchanged. A model with grouped key/value
heads on transformers' ``sdpa`` attention is also switched to :mod:`pyshrink.runtime.attention`'s (the same
SDPA, with a one-token step's queries regrouped per key/value head instead of the cache copied per query head,
over the filled positions only; ``gqa_attention`` says whether it was switched). Other models' steps attend
over the static cache's whole capacity, masked, so their attention costs in proportion to ``max_length``.
"""
from __future__ import annotations

import torch

from ..arch import adapter_for
from ..errors import InvalidSetting, check_range
from ..kv_cache import cache_inputs
from ..ops.threads import kernel_threads
from ..quantize.linear import is_quantized
from . import attention


class TorchDecoder:
    """One sequence at a time on ``model``: :meth:`prefill` a prompt, then :meth:`step` token by token.

    ``max_length`` is the KV cache's capacity (prompt + generated tokens). ``compile`` (default True) runs
    the step through ``torch.compile(fullgraph=True, dynamic=False)``; ``compile_options`` go to inductor
    (e.g. ``{"cpp_wrapper": True}``: the graph's calls made from C++, faster per step, slower to compile).
    ``fuse`` (default True) fuses the projections; ``fused_groups`` says how many groups were fused.
    ``threads`` (default: ``torch.get_num_threads()`` now) is the thread count for pyshrink's kernels during
    the prompt and each step; ``torch_threads`` torch's then (default: 1 for a model with pyshrink-quantized
    layers, else ``threads``: a float model's matmuls are torch's own). Both are fixed here, at construction.
    """

    def __init__(self, model, max_length: int, *, compile: bool = True, fuse: bool = True,
                 compile_options: dict | None = None, threads: int | None = None, torch_threads: int | None = None):
        from transformers import StaticCache

        check_range("max_length", max_length, 2, 1 << 20, integer=True)
        adapter = adapter_for(model)
        if adapter.kind != "decoder":
            raise InvalidSetting(f"TorchDecoder needs a causal LM; {adapter.name} models are encoders")
        self.model, self.max_length, self.length = model.eval(), int(max_length), 0
        self.device = next(model.parameters()).device  # ids and positions are made where the model runs
        self.threads = check_range("threads", threads if threads is not None else torch.get_num_threads(), 1, 1024,
                                   integer=True)
        quantized = any(is_quantized(m) for m in model.modules())
        self.torch_threads = check_range("torch_threads", torch_threads if torch_threads is not None
                                         else (1 if quantized else self.threads), 1, 1024, integer=True)
        self.fused_groups = 0
        if fuse:
            if adapter.fuse is None:
                raise InvalidSetting(f"fuse=True: pyshrink cannot fuse the projections of {adapter.name} models "
                                     "(use fuse=False)")
            self.fused_groups = sum(adapter.fuse(b) for b in adapter.blocks(model))
        self.gqa_attention = attention.use_for_decoding(model)
        self.cache = StaticCache(config=_full_attention_config(model.config), max_cache_len=self.max_length)
        # the whole cache unmasked: the causal mask from the positions keeps each query to the filled part
        self._mask = (torch.ones(1, self.max_length, dtype=torch.long, device=self.device)
                      if adapter.decode_with_mask else None)
        self._compiled = (torch.compile(self._forward, fullgraph=True, dynamic=False, options=compile_options)
                          if compile else self._forward)

    def _forward(self, ids, positions):
        extra = {} if self._mask is None else {"attention_mask": self._mask, "position_ids": positions[None]}
        extra = {**cache_inputs(self.model, self.cache, positions), **extra}
        out = self.model(ids, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[0, -1]

    def prefill(self, ids) -> torch.Tensor:
        """Start a new sequence with the prompt ``ids``; returns the logits after its last token."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(self.device)
        n = ids.shape[1]
        if not 1 <= n < self.max_length:
            raise InvalidSetting(f"the prompt has {n} tokens; it must have 1..{self.max_length - 1} "
                                 f"(max_length={self.max_length})")
        # the cache's tensors are inference tensors: reset them in that mode too
        with torch.inference_mode(), kernel_threads(self.threads, torch_threads=self.torch_threads):
            self.cache.reset()
            logits = self._forward(ids, torch.arange(n, device=self.device))
        self.length = n
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Append ``token``; returns the logits after it."""
        if self.length == 0:
            raise InvalidSetting("call prefill() before step()")
        if self.length >= self.max_length:
            raise InvalidSetting(f"the KV cache is full (max_length={self.max_length})")
        with torch.inference_mode(), kernel_threads(self.threads, torch_threads=self.torch_threads):
            logits = self._compiled(torch.tensor([[int(token)]], device=self.device),
                                    torch.tensor([self.length], device=self.device))
        self.length += 1
        return logits


def _full_attention_config(config):
    """``config`` with every layer's cache full-length. A sliding-window layer's static cache (Mistral, Qwen2's
    sliding layers) keeps a Python count of the tokens seen, which torch.compile guards on: the compiled step
    recompiled every token and failed at the recompile limit. Full-length caches hold the same keys, and the
    model's own masks still keep each query to its window."""
    import copy

    if not getattr(config, "sliding_window", None):
        return config
    config = copy.deepcopy(config)
    config.sliding_window = None
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return config
