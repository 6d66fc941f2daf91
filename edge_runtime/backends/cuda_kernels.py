"""Host launchers for kernels/sparse_ffn.cu (CuPy RawModule). Each asserts dtype, shape and contiguity.

CuPy compiles the module with NVRTC for the current device's architecture on first use and caches the
binary on disk (~/.cupy/kernel_cache), so start-up after the first run only loads it.
Buffers: activations float32; weights as stored in the packed format (fp16, int8 + fp16 row scales, or
int4 nibbles + fp16 group scales); sign planes uint32; active lists int32 + float32 with an int32 count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError


def kernel_source(name: str) -> Path:
    """kernels/<name> of a checkout, else where a wheel installs it (<prefix>/share/edge-runtime/kernels)."""
    for d in (Path(__file__).resolve().parents[2] / "kernels", Path(sys.prefix) / "share" / "edge-runtime" / "kernels"):
        if (d / name).is_file():
            return d / name
    raise EdgeRuntimeError(f"kernel source {name} not found; reinstall edge-runtime")



THREADS = 256  # 8 warps: 8 rows per block for the row kernels
ENC = {"fp16": "fp16", "int8": "int8", "int4": "int4"}


def _cupy():
    try:
        import cupy
    except ImportError:
        raise EdgeRuntimeError("the CUDA kernels need CuPy (pip install 'edge-runtime[cuda]')") from None
    return cupy


class DeviceMatrix:
    """A packed (N, K) matrix on the device: `w` and, for int8/int4, `scale`; `group` for int4."""

    def __init__(self, packed):
        cp = _cupy()
        enc = packed.encoding
        if enc not in ENC:
            raise EdgeRuntimeError(f"no CUDA kernel for encoding {enc!r} (have {', '.join(ENC)})")
        n, k = packed.shape
        need = {"fp16": 8, "int8": 16, "int4": 32}[enc]
        if k % need:
            raise EdgeRuntimeError(f"{enc} kernels need K % {need} == 0, got K = {k}")
        self.encoding, self.shape, self.group = enc, (n, k), packed.group_size
        src = packed.arrays["w"] if enc == "fp16" else packed.arrays["q"]
        self.w = cp.asarray(np.ascontiguousarray(src))
        self.scale = cp.asarray(np.ascontiguousarray(packed.arrays["scale"])) if "scale" in packed.arrays else \
            cp.zeros(1, dtype=cp.float16)
        self.nbytes = int(self.w.nbytes + (self.scale.nbytes if "scale" in packed.arrays else 0))


class SparseFFNKernels:
    """One module, its kernels, and typed launchers for the decode FFN."""

    def __init__(self, source: Path | None = None):
        cp = _cupy()
        self.cp = cp
        source = source or kernel_source("sparse_ffn.cu")
        self.module = cp.RawModule(code=source.read_text(), options=("-std=c++17",))
        self._k = {}

    def kernel(self, name: str):
        if name not in self._k:
            self._k[name] = self.module.get_function(name)
        return self._k[name]

    @staticmethod
    def _check(a, dtype, shape, what: str) -> None:
        if a.dtype != dtype or tuple(a.shape) != tuple(shape) or not a.flags.c_contiguous:
            raise EdgeRuntimeError(f"{what}: want {np.dtype(dtype).name}{tuple(shape)} contiguous, "
                                   f"got {a.dtype}{tuple(a.shape)}")

    def prepare_x(self, x, x_signs, x_sum, count, predicted) -> None:
        k = x.shape[0]
        self._check(x, np.float32, (k,), "x")
        self._check(x_signs, np.uint32, (-(-k // 32),), "x_signs")
        self.kernel("prepare_x")((1,), (1024,), (x, np.int32(k), x_signs, x_sum, count, predicted))

    def _rows_grid(self, n: int) -> tuple:
        return (-(-n // (THREADS // 32)),)

    def sparseinfer_gate(self, gate: DeviceMatrix, x, x_signs, gate_signs, alpha_ptr, threshold: float, idx, gval,
                         count, predicted) -> None:
        n, k = gate.shape
        self._check(gate_signs, np.uint32, (n, -(-k // 32)), "gate_signs")
        self.kernel(f"sparseinfer_gate_{gate.encoding}")(
            self._rows_grid(n), (THREADS,), (gate.w, gate.scale, np.int32(gate.group), x, x_signs, gate_signs,
                                             alpha_ptr, np.float32(threshold), np.int32(n), np.int32(k), idx, gval,
                                             count, predicted), shared_mem=4 * k)

    def projection_gate(self, gate: DeviceMatrix, x, x_sum, gate_signs, theta, threshold: float, idx, gval, count,
                        predicted) -> None:
        n, k = gate.shape
        self._check(theta, np.float32, (n,), "theta")
        self.kernel(f"projection_gate_{gate.encoding}")(
            self._rows_grid(n), (THREADS,), (gate.w, gate.scale, np.int32(gate.group), x, x_sum, gate_signs, theta,
                                             np.float32(threshold), np.int32(n), np.int32(k), idx, gval, count,
                                             predicted), shared_mem=4 * k)

    def up_sparse(self, up: DeviceMatrix, x, idx, gval, count, h) -> None:
        n, k = up.shape
        self.kernel(f"up_sparse_{up.encoding}")(
            self._rows_grid(n), (THREADS,), (up.w, up.scale, np.int32(up.group), x, np.int32(k), idx, gval, count, h),
            shared_mem=4 * k)

    def down_sparse(self, down_t: DeviceMatrix, idx, h, count, y, row_splits: int = 64) -> None:
        n, d = down_t.shape
        self._check(y, np.float32, (d,), "y")
        y.fill(0)
        cols = -(-d // (8 * 128))
        self.kernel(f"down_sparse_{down_t.encoding}")(
            (cols, row_splits), (128,), (down_t.w, down_t.scale, np.int32(down_t.group), np.int32(d), idx, h, count, y))

    def gemv(self, m: DeviceMatrix, x, y) -> None:
        n, k = m.shape
        self._check(x, np.float32, (k,), "x")
        self._check(y, np.float32, (n,), "y")
        self.kernel(f"gemv_{m.encoding}")(self._rows_grid(n), (THREADS,),
                                          (m.w, m.scale, np.int32(m.group), x, np.int32(n), np.int32(k), y),
                                          shared_mem=4 * k)


class SparseFFN:
    """The decode FFN of one layer on the device: predictor + gate, up, down; buffers allocated once
    (paired with free()). `run` issues only device work: capturable in a CUDA graph."""

    def __init__(self, kernels: SparseFFNKernels, gate, up, down_t, gate_signs: np.ndarray, threshold: float = 0.0):
        cp = kernels.cp
        self.k = kernels
        self.gate, self.up, self.down_t = DeviceMatrix(gate), DeviceMatrix(up) if up is not None else None, \
            DeviceMatrix(down_t)
        n, d = self.gate.shape
        self.gate_signs = cp.asarray(np.ascontiguousarray(gate_signs))  # (N, ceil(d/32)) uint32
        self.threshold = threshold
        self.x_signs = cp.zeros(-(-d // 32), dtype=cp.uint32)
        self.x_sum = cp.zeros(1, dtype=cp.float32)
        self.count = cp.zeros(1, dtype=cp.int32)
        self.predicted = cp.zeros(1, dtype=cp.int32)
        self.idx = cp.zeros(n, dtype=cp.int32)
        self.gval = cp.zeros(n, dtype=cp.float32)
        self.h = cp.zeros(n, dtype=cp.float32)
        self.y = cp.zeros(d, dtype=cp.float32)

    def run(self, x, alpha_ptr=None, theta=None):
        """x (d,) float32 on the device -> y (d,) float32 (this object's buffer). SparseInfer with a
        device alpha, or the projection predictor with device thresholds theta (N,)."""
        self.k.prepare_x(x, self.x_signs, self.x_sum, self.count, self.predicted)
        if theta is not None:
            self.k.projection_gate(self.gate, x, self.x_sum, self.gate_signs, theta, self.threshold, self.idx,
                                   self.gval, self.count, self.predicted)
        else:
            self.k.sparseinfer_gate(self.gate, x, self.x_signs, self.gate_signs, alpha_ptr, self.threshold, self.idx,
                                    self.gval, self.count, self.predicted)
        h = self.gval
        if self.up is not None:
            self.k.up_sparse(self.up, x, self.idx, self.gval, self.count, self.h)
            h = self.h
        self.k.down_sparse(self.down_t, self.idx, h, self.count, self.y)
        return self.y

    def free(self) -> None:
        for name in ("gate", "up", "down_t", "gate_signs", "x_signs", "x_sum", "count", "predicted", "idx", "gval",
                     "h", "y"):
            setattr(self, name, None)
