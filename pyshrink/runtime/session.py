"""One exported decoder on ONNX Runtime, and the per-sequence KV state that runs through it.

On the CPU the past and present KV tensors of a sequence are *one* buffer ``[1, kv_heads, capacity,
head_dim]`` per layer, bound as both input and output through IOBinding: ``GroupQueryAttention`` appends
the new token's keys and values in place, so a decode step moves no cache memory. Every sequence
(every server request) owns its :class:`KVState`; the InferenceSession is shared, which ONNX Runtime
allows (``run`` is thread-safe).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

META_FILE = "pyshrink_onnx.json"


def read_meta(folder) -> dict:
    f = Path(folder) / META_FILE
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder: expected a folder written by "
                                "`pyshrink export`")
    if not f.is_file():
        raise FileNotFoundError(f"{folder} has no {META_FILE}: not a folder written by `pyshrink export`")
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{f} is corrupt: {exc}") from exc


def open_session(model, label, *, threads: int | None = None, providers=None):
    """An ONNX Runtime session of ``model`` (a path or serialized bytes; ``label`` names it in errors). A file ONNX
    Runtime cannot read (its own exception types: InvalidProtobuf, Fail, ...) is a one-line ModelLoadError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, session_options(threads),
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"ONNX Runtime cannot load {label}: is the export complete and unchanged? "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


class KVState:
    """The KV cache of one sequence: ``length`` tokens so far, room for ``capacity``."""

    def __init__(self, session: "DecoderSession", capacity: int):
        self.capacity = int(capacity)
        self.length = 0
        self.shared = session.shared
        self.binding = None
        if self.shared:
            import onnxruntime as ort

            self.buffers = []
            self.binding = session.sess.io_binding()
            self.binding.bind_output("logits")  # first bound output: read back by index 0
            for i, layer in enumerate(session.layers):
                shape = (1, layer["num_kv_heads"], self.capacity, layer["head_dim"])
                for kind in ("key", "value"):
                    buf = np.zeros(shape, dtype=np.float32)
                    val = ort.OrtValue.ortvalue_from_numpy(buf)
                    self.buffers.append((buf, val))  # keep the numpy memory alive
                    self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", val)
                    self.binding.bind_ortvalue_output(f"present.{i}.{kind}", val)
        else:
            self.past = {}
            for i, layer in enumerate(session.layers):
                for kind in ("key", "value"):
                    self.past[f"past_key_values.{i}.{kind}"] = np.zeros(
                        (1, layer["num_kv_heads"], 0, layer["head_dim"]), dtype=np.float32)


class DecoderSession:
    """``step(state, token_ids) -> logits of the last position`` for a folder written by ``pyshrink export``."""

    def __init__(self, folder, *, providers=None, threads: int | None = None, meta: dict | None = None,
                 model_bytes: bytes | None = None):
        folder = Path(folder)
        self.folder = folder
        self.meta = meta or read_meta(folder)
        if self.meta.get("kind") != "decoder":
            raise ValueError(f"{folder} holds a {self.meta.get('kind')} model; generation needs a decoder")
        path = folder / self.meta["model_file"]
        self.sess = open_session(model_bytes if model_bytes is not None else str(path), path, threads=threads,
                                 providers=providers)
        self.layers = self.meta["layers"]
        self.max_length = int(self.meta["max_length"])
        # past/present sharing through IOBinding is done on CPU memory
        self.shared = self.sess.get_providers()[0] == "CPUExecutionProvider"

    def new_state(self, capacity: int | None = None) -> KVState:
        capacity = min(int(capacity or self.max_length), self.max_length)
        return KVState(self, capacity)

    def step(self, state: KVState, ids) -> np.ndarray:
        """Feed ``ids`` (1-D) after what ``state`` holds; returns float32 logits ``[vocab]`` of the last one."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = state.length + ids.shape[1]
        if ids.shape[1] == 0:
            raise ValueError("step needs at least one token")
        if total > state.capacity:
            raise ValueError(f"sequence of {total} tokens exceeds this state's capacity of {state.capacity} "
                             f"(the model's maximum length is {self.max_length})")
        mask = np.ones((1, total), dtype=np.int64)
        if state.shared:
            b = state.binding
            if self.meta.get("logits") == "all":
                # logits [1, len(ids), vocab]: ORT keeps the last run's output bound, whose shape would not fit a
                # step of another length, so let it allocate them afresh (the last-position export's never change)
                b.bind_output("logits")
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("attention_mask", mask)
            self.sess.run_with_iobinding(b)
            logits = b.get_outputs()[0].numpy().copy()  # the OrtValue's memory is reused by the next run
        else:
            names = [o.name for o in self.sess.get_outputs()]
            outs = dict(zip(names, self.sess.run(None, {"input_ids": ids, "attention_mask": mask, **state.past})))
            logits = outs["logits"]
            for k in state.past:
                state.past[k] = outs[k.replace("past_key_values.", "present.")]
        state.length = total
        return logits[0, -1]
