"""Generation and serving of exported ONNX folders with onnxruntime, numpy and tokenizers only (no torch).

Recipe::

    from pyshrink.runtime import OnnxLM, make_server
    lm = OnnxLM("out/smollm2-onnx")
    print(lm.generate("The capital of France is", max_new_tokens=20).text)          # greedy
    print(lm.generate("Once upon a time", 40, temperature=0.8, top_p=0.95, seed=1).text)
    make_server("out/smollm2-onnx", port=8000).serve_forever()   # POST /v1/completions, GET /health
"""
from .generate import Completion, OnnxLM, Sampling, sample
from .server import CompletionService, Limits, make_server, serve
from .session import DecoderSession, KVState, read_meta

__all__ = ["OnnxLM", "Sampling", "Completion", "sample", "DecoderSession", "KVState", "read_meta",
           "make_server", "serve", "Limits", "CompletionService"]
