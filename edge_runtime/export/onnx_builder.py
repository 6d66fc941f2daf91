"""A small ONNX graph builder over the `onnx` helper API: unique names, inline constants, and weights
streamed to an external data file one tensor at a time.

Why stream: onnx.save keeps every initialiser in the protobuf and serialises it in one piece, so the
peak memory of an export would be twice the weights, and protobuf cannot hold more than 2 GB at all.
Here each large initialiser is written to the data file as soon as it is made, and the protobuf holds
only (location, offset, length); peak memory is the largest single tensor.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

DATA_ALIGN = 4096  # external offsets page-aligned, so that ONNX Runtime can mmap the weights
INLINE_MAX_BYTES = 1024  # shape constants and other small tensors stay in the graph itself


def int4_bytes(q: np.ndarray) -> bytes:
    """int8 values in [-8, 7] -> ONNX INT4 raw data: row-major, two per byte, element 2i in the low
    nibble, two's complement (so nibble = q & 0xF); an odd count is padded with a zero nibble."""
    flat = (np.ascontiguousarray(q).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


class GraphBuilder:
    """Collects nodes, initialisers and graph inputs/outputs for one onnx.GraphProto.

    data_file: an open binary file for external data (None: every initialiser inline), referenced in
    the model as `data_name`, a path relative to the .onnx file."""

    def __init__(self, opset: int, data_file: BinaryIO | None = None, data_name: str | None = None):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._data, self._data_name = data_file, data_name
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    # ---- nodes ---------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, name: str | None = None, n_out: int = 1, **attrs):
        """Append one node; returns its output name (a tuple when n_out > 1). `name` names the output."""
        outs = [name] if (name and n_out == 1) else [self._name(name or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else tuple(outs)

    def reduce_mean_last(self, x: str) -> str:
        """Mean over the last axis, kept: ReduceMean took `axes` as an attribute before opset 18."""
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const([-1]), keepdims=1)
        return self.op("ReduceMean", x, axes=[-1], keepdims=1)

    # ---- tensors -------------------------------------------------------------------------------------
    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant (shapes, axes, scalars), shared between nodes that use the same one."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(self._name("const"), arr)
        return self._consts[key]

    def initializer(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        return self.raw_initializer(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, arr)

    def raw_initializer(self, name: str, data_type: int, dims, data: np.ndarray | bytes) -> str:
        """An initialiser from its raw little-endian bytes (numpy buffer or bytes: int4 is pre-packed)."""
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        buf = memoryview(data).cast("B")  # a view: the array is not copied
        if self._data is None or buf.nbytes <= INLINE_MAX_BYTES:
            t.raw_data = bytes(buf)
        else:
            offset = self._data.tell()
            pad = -offset % DATA_ALIGN
            self._data.write(b"\0" * pad)
            self._data.write(buf)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self._data_name), ("offset", offset + pad), ("length", buf.nbytes)):
                entry = t.external_data.add()
                entry.key, entry.value = k, str(v)
        self.initializers.append(t)
        return name

    # ---- graph ---------------------------------------------------------------------------------------
    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, graph_name: str, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                              producer_name="edge-runtime")
        # The lowest IR version that carries this opset: older readers (TensorRT's parser) accept it.
        m.ir_version = 10 if self.opset >= 21 else 8
        helper.set_model_props(m, metadata)
        return m
