"""Former home of the CUDA launchers, kept as a stable import path: the launchers now live one per kernel file in
edge_runtime/backends/cuda_ops/ (see its package docstring)."""

from edge_runtime.backends.cuda_ops.common import DeviceMatrix, kernel_source
from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFN, SparseFFNKernels

__all__ = ["DeviceMatrix", "SparseFFN", "SparseFFNKernels", "kernel_source"]
