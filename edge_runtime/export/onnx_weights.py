"""Packed weights -> ONNX initialisers (plus the Cast or DequantizeLinear that turns them into fp32).

Export dtypes:
  fp32    every matrix dequantised to an fp32 initialiser (exactly the values the numpy backend uses)
  fp16    every matrix as an fp16 initialiser followed by Cast(float): half the file; the graph still
          computes in fp32 (ONNX Runtime and TensorRT fold the Cast; `trtexec --fp16` picks fp16 kernels)
  packed  the stored encoding kept: int8 per-row -> DequantizeLinear per axis (scale (N,));
          int4 groups -> blocked DequantizeLinear (opset 21, block_size = group, along K, K unpadded);
          fp16 -> fp16 + Cast; fp32 as is. Compressed sparse-* matrices become dense int8 / fp16 (ONNX
          has no such format), with the same values.
All scales are widened fp16 -> fp32 (exact), so DequantizeLinear computes q * scale in fp32 as the
numpy backend does.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edge_runtime.export.onnx_builder import GraphBuilder, int4_bytes
from edge_runtime.pack.quant import PackedTensor

EXPORT_DTYPES = ("fp32", "fp16", "packed")


def _int8_parts(pt: PackedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(q (N, K) int8, scale (N,) float32) of an int8 or sparse-int8 matrix."""
    if pt.encoding == "int8":
        return np.asarray(pt.arrays["q"]), pt.arrays["scale"].astype(np.float32)
    n, k = pt.shape  # sparse-int8: the kept values at their bitmap positions, zeros elsewhere
    mask = np.unpackbits(pt.arrays["bitmap"], axis=1, bitorder="little")[:, :k].astype(bool)
    q = np.zeros((n, k), dtype=np.int8)
    q[mask] = pt.arrays["values"]
    return q, pt.arrays["scale"].astype(np.float32)


def _int4_parts(pt: PackedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(q (N, K) int8 in [-8, 7] with the group padding of K dropped, scale (N, Kp/group) float32)."""
    packed = np.asarray(pt.arrays["q"])  # (N, Kp/2) uint8, low nibble = even column, nibble = q + 8
    q = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)
    q[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    q[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return q[:, : pt.shape[1]], pt.arrays["scale"].astype(np.float32)


def _fp16(g: GraphBuilder, name: str, w: np.ndarray) -> str:
    g.initializer(name, w.astype(np.float16))
    return g.op("Cast", name, to=TensorProto.FLOAT)


def float_weight(g: GraphBuilder, name: str, pt: PackedTensor, dtype: str, transpose: bool) -> str:
    """A float32 graph tensor holding pt's matrix: W^T (K, N) when transpose (the MatMul operand for
    y = x W^T), else the stored (N, K) layout (Gather tables, Gemm with transB, down_t which is
    already (ffn_dim, d) = (K, N) of its product)."""
    if dtype == "packed" and pt.encoding in ("int8", "sparse-int8"):
        q, scale = _int8_parts(pt)  # scale per stored row: axis 1 of W^T, axis 0 of W
        g.initializer(name, q.T if transpose else q)
        return g.op("DequantizeLinear", name, g.initializer(name + ".scale", scale), axis=1 if transpose else 0)
    if dtype == "packed" and pt.encoding == "int4":
        q, scale = _int4_parts(pt)  # groups run along the stored K: axis 0 of W^T, axis 1 of W
        if transpose:
            q, scale = q.T, scale.T
        g.raw_initializer(name, TensorProto.INT4, q.shape, int4_bytes(q))
        return g.op("DequantizeLinear", name, g.initializer(name + ".scale", np.ascontiguousarray(scale)),
                    axis=0 if transpose else 1, block_size=pt.group_size)
    w = pt.dequantize()  # (N, K) float32
    if transpose:
        w = w.T
    keep_fp32 = dtype == "fp32" or (dtype == "packed" and pt.encoding == "fp32")
    if keep_fp32:
        return g.initializer(name, w)
    return _fp16(g, name, w)


def float_vector(g: GraphBuilder, name: str, v: np.ndarray) -> str:
    """Norm weights and biases: always fp32 initialisers (small; fp16 -> fp32 is exact)."""
    return g.initializer(name, np.asarray(v, dtype=np.float32))
