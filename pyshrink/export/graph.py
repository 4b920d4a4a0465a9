"""A small ONNX graph writer: named nodes, deduplicated constants, initializers from torch or numpy.

The exporters build graphs node by node (rather than tracing) so that every layer can have its own width
and head count, and so that the fused ONNX Runtime operators are used exactly where we want them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
IR_VERSION = 10  # what onnxruntime >= 1.18 reads (onnx 1.23 would write 14 by default)
DEFAULT_OPSET = 21


def to_numpy(t) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    return t.detach().cpu().contiguous().numpy()


class Graph:
    """Collects nodes, initializers, inputs and outputs; :meth:`model` turns them into a ModelProto."""

    def __init__(self, name: str, opset: int = DEFAULT_OPSET):
        self.name = name
        self.opset = opset
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._names: set = set()
        self._consts: dict = {}
        self.initializer_bytes = 0

    # ---- names ---------------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    # ---- values --------------------------------------------------------------------------------------
    def input(self, name: str, elem_type, shape) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type, shape) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def initializer(self, name: str, array) -> str:
        arr = to_numpy(array)
        name = self.unique(name)
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
            arr = np.ascontiguousarray(arr)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.initializer_bytes += arr.nbytes
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shared between nodes that use the same value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(f"const_{arr.dtype.name}_{len(self._consts)}", arr)
        return self._consts[key]

    # ---- nodes ---------------------------------------------------------------------------------------
    def node(self, op: str, inputs, name: str, n_out: int = 1, domain: str | None = None, outputs=None, **attrs):
        """Add a node; returns its output name (or the list of them when ``n_out > 1``)."""
        name = self.unique(name)
        if outputs is None:
            outputs = [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self, *, producer: str = "pyshrink") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid(MS, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = IR_VERSION
        return model


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
