"""A small ONNX graph builder over `onnx.helper`: nodes with generated names, numpy initializers,
cached int64 constants, and saving with the weights in one external data file beside the graph.

Building graphs directly (as onnxruntime-genai's model builder does) rather than tracing torch
gives full control over input/output names, dynamic axes and which operators are used, so one
builder emits both the portable (standard operators) and the optimised (com.microsoft) variant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.bool_): TensorProto.BOOL}


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one graph."""

    def __init__(self, name: str, opset: int):
        self.name, self.opset = name, opset
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._count = 0
        self._consts: dict = {}
        self.uses_ms_domain = False

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "", name: Optional[str] = None,
           **attrs):
        """Add a node; returns its output name (or a list of them when n_out > 1)."""
        self._count += 1
        base = name or f"/{op_type}_{self._count}"
        outs = [f"{base}/output_{i}" for i in range(n_out)]
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], domain: str = "", **attrs) -> None:
        """Add a node writing to given output names (graph outputs)."""
        self._count += 1
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=f"/{op_type}_{self._count}",
                                           domain=domain or None, **attrs))

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, values, dtype=np.int64) -> str:
        """A small constant initializer (shared between uses); scalars stay 0-d."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape: Sequence) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def optional_input(self, name: str, default: np.ndarray, shape: Sequence) -> str:
        """A graph input with a default value (an initializer of the same name): callers that do not
        feed it (onnxruntime-genai, optimum) get the default; onnxruntime lists it among the
        overridable initializers, not among the inputs."""
        self.weight(name, default)
        self.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[default.dtype], list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def model(self, producer: str = "mmfuse") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer)
        model.ir_version = min(model.ir_version, 10)  # what current onnxruntime releases read
        return model


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Write `path` and its weights to `path.name + ".data"` beside it (no 2 GiB protobuf limit);
    small constants stay in the graph, where shape inference reads them."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph`'s nodes so that each follows the producers of its inputs (Kahn's algorithm;
    onnxruntime's fp16 converter appends the casts it inserts after their users)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    waiting = [sum(1 for x in node.input if x in produced_by) for node in graph.node]  # inputs not yet available
    users = {}
    for i, node in enumerate(graph.node):
        for x in node.input:
            if x in produced_by:
                users.setdefault(x, []).append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for out in graph.node[i].output:
            for j in users.get(out, ()):
                waiting[j] -= 1
                if waiting[j] == 0:
                    ready.append(j)
    if len(order) != len(graph.node):
        raise ValueError(f"graph {graph.name!r} has a cycle: {len(graph.node) - len(order)} nodes never become ready")
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
