"""Launchers for kernels/sparse_ffn.cu (and the compressed-row down of kernels/sparse_weights.cu): the decode FFN
in three launches, prepare -> predictor+gate(+up) -> down, with the active list and its counts on the device.
Numpy twin: CpuBackend.ffn_sparse."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.cuda_ops.common import (
    COL_THREADS,
    THREADS,
    DeviceMatrix,
    Module,
    as_matrix,
    check,
    check_opt,
    column_grid,
    cupy,
    f32,
    i32,
    row_grid,
    row_smem,
    smem_optin,
)
from edge_runtime.errors import EdgeRuntimeError

PREDICTORS = ("sparseinfer", "projection")
LUT_BYTES_PER_WORD = 16 * 8 * 4  # projection table: 16 patterns x 8 nibbles of a sign word, fp32


class SparseFFNKernels:
    """Typed launchers; buffers are the caller's (see SparseFFN for a set allocated once)."""

    def __init__(self):
        self.cp = cupy()
        self.m = Module("sparse_ffn.cu")
        self.csr = None  # kernels/sparse_weights.cu, loaded when a compressed down matrix is used

    def prepare(self, x, norm_w, norm_b, eps: float, residual, down_b, xn, x_signs, x_sum, counters, y,
                threads: int = 1024) -> None:
        """xn = norm(x) (norm_w None: no norm; norm_b None: RMSNorm), x_signs/x_sum of xn, counters = 0,
        y = residual + down_b (either None: 0). x, residual, y may be one buffer. All (K,) fp32."""
        k = x.shape[0] if x is not None else -1
        check(x, np.float32, (k,), "x")
        check_opt(norm_w, np.float32, (k,), "norm_w")
        check_opt(norm_b, np.float32, (k,), "norm_b")
        if norm_b is not None and norm_w is None:
            raise EdgeRuntimeError("norm_b without norm_w")
        check_opt(residual, np.float32, (k,), "residual")
        check_opt(down_b, np.float32, (k,), "down_b")
        check(xn, np.float32, (k,), "xn")
        check(x_signs, np.uint32, (-(-k // 32),), "x_signs")
        check(x_sum, np.float32, (1,), "x_sum")
        check(counters, np.int32, (2,), "counters")
        check(y, np.float32, (k,), "y")
        if xn is x:
            raise EdgeRuntimeError("xn must not alias x")
        self.m.launch("ffn_prepare", (1,), (threads,), (x, norm_w, norm_b, f32(eps), i32(k), residual, down_b, xn,
                                                        x_signs, x_sum, counters, y))

    def gate(self, predictor: str, gate: DeviceMatrix, up: DeviceMatrix | None, gate_b, up_b, xn, x_signs, x_sum,
             gate_signs, knob, threshold: float, idx, h, counters, max_blocks: int | None = None,
             up_relu: bool = False, up_dropped=None, lut: bool | None = None) -> None:
        """Predictor + gate (+ up): appends (row, h) for every row predicted active whose gate survives
        (g > 0 and g >= threshold); h = g * (up.x + up_b), or g without up. knob: alpha (1,) fp32 for
        sparseinfer, theta (N,) fp32 for projection, both device memory. up_relu (dReLU): rows whose
        up.x + up_b is not positive are dropped too, counted into up_dropped (1,) uint64 (device) when given.
        lut (projection): score rows through the nibble table in shared memory (None: wherever it fits; it
        takes 512 B per 32 inputs, 64 KB at d = 4096), else by walking each sign word's set bits."""
        if predictor not in PREDICTORS:
            raise EdgeRuntimeError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
        gate = as_matrix(gate)
        gate.check_row_kernel("gate")
        n, k = gate.shape
        if up is not None:
            up = as_matrix(up)
            if (up.shape, up.encoding, up.group) != (gate.shape, gate.encoding, gate.group):
                raise EdgeRuntimeError(f"up {up.encoding}{up.shape} must match gate {gate.encoding}{gate.shape}")
        check_opt(gate_b, np.float32, (n,), "gate_b")
        check_opt(up_b, np.float32, (n,), "up_b")
        if up is None and up_b is not None:
            raise EdgeRuntimeError("up_b without an up matrix")
        check(xn, np.float32, (k,), "xn")
        check(x_signs, np.uint32, (-(-k // 32),), "x_signs")
        check(x_sum, np.float32, (1,), "x_sum")
        check(gate_signs, np.uint32, (n, -(-k // 32)), "gate_signs")
        check(knob, np.float32, (1,) if predictor == "sparseinfer" else (n,),
              "alpha" if predictor == "sparseinfer" else "theta")
        check(idx, np.int32, (n,), "idx")
        check(h, np.float32, (n,), "h")
        check(counters, np.int32, (2,), "counters")
        if up_relu and up is None:
            raise EdgeRuntimeError("up_relu without an up matrix")
        if up_dropped is not None:
            check(up_dropped, np.uint64, (1,), "up_dropped")
        u_w = u_s = u_bm = u_off = None
        if up is not None:
            u_w, u_s, _, u_bm, u_off = up.row_args()
        g_w, g_s, group, g_bm, g_off = gate.row_args()
        smem = row_smem(gate)
        name = f"ffn_gate_{predictor}_{gate.kenc}"
        use_lut = False
        if predictor == "projection":  # the table only where it fits beside the kernel's static shared memory
            table = LUT_BYTES_PER_WORD * -(-k // 32)
            use_lut = smem + table + self.m.info(name).static_smem <= smem_optin() if lut is None else lut
            smem += table if use_lut else 0
        grid = row_grid(n, max_blocks=max_blocks, smem=smem, regs=self.m.info(name).registers)
        self.m.launch(name, grid, (THREADS,),
                      (g_w, g_s, gate_b, g_bm, g_off, u_w, u_s, up_b, u_bm, u_off, group, i32(n), i32(k),
                       i32(gate.kp), xn, x_signs, x_sum, gate_signs, knob, f32(threshold), i32(int(up_relu)),
                       up_dropped, i32(int(use_lut)), idx, h, counters),
                      shared_mem=smem)

    def down(self, down_t: DeviceMatrix, idx, h, counters, stats, layer: int, y, row_splits: int | None = None
             ) -> None:
        """y += sum over the active list of h * down_t[idx]; stats[layer] += (predicted, kept).
        down_t (N, D) packed; stats (n_layers, 2) uint64. row_splits: splits of the list (None: column_grid's
        choice)."""
        down_t = as_matrix(down_t)
        n, d = down_t.shape
        check(idx, np.int32, (n,), "idx")
        check(h, np.float32, (n,), "h")
        check(counters, np.int32, (2,), "counters")
        check(stats, np.uint64, (-1, 2), "stats")
        if not 0 <= layer < stats.shape[0]:
            raise EdgeRuntimeError(f"layer {layer} outside stats ({stats.shape[0]} layers)")
        check(y, np.float32, (d,), "y")
        down_t.check_column_kernel("down")
        if down_t.sparse:
            if self.csr is None:
                self.csr = Module("sparse_weights.cu")
            self.csr.launch(f"csr_down_{down_t.kenc[4:]}", column_grid(d, n, row_splits), (COL_THREADS,),
                            (down_t.w, down_t.scale, down_t.bitmap, down_t.row_offsets, down_t.tile_offsets, i32(d),
                             idx, h, counters, stats, i32(layer), y))
            return
        self.m.launch(f"ffn_down_{down_t.kenc}", column_grid(d, n, row_splits), (COL_THREADS,),
                      (down_t.w, down_t.scale, i32(down_t.group), i32(d), i32(down_t.kp), idx, h, counters, stats,
                       i32(layer), y))


class SparseFFN:
    """One layer's decode FFN on the device, buffers allocated once (paired with free()). `run` issues only
    device work (graph-capturable). Weights: PackedTensor gate, up (None for OPT), down_t (N, d); biases
    (fp32 numpy or None); gate_signs (N, ceil(d/32)) uint32; threshold: FATReLU (0 = ReLU)."""

    def __init__(self, kernels: SparseFFNKernels, gate, up, down_t, gate_signs: np.ndarray, threshold: float = 0.0,
                 gate_b=None, up_b=None, down_b=None, n_layers: int = 1):
        cp = kernels.cp
        self.k = kernels
        self.gate, self.down_t = DeviceMatrix(gate), DeviceMatrix(down_t, column_kernel=True)
        self.up = DeviceMatrix(up) if up is not None else None
        n, d = self.gate.shape

        def dev(v):
            return None if v is None else cp.asarray(np.ascontiguousarray(v, dtype=np.float32))

        self.gate_b, self.up_b, self.down_b = dev(gate_b), dev(up_b), dev(down_b)
        self.gate_signs = cp.asarray(np.ascontiguousarray(gate_signs, dtype=np.uint32))  # (N, ceil(d/32))
        self.threshold = threshold
        self.xn = cp.zeros(d, dtype=cp.float32)  # (d,) normed input
        self.x_signs = cp.zeros(-(-d // 32), dtype=cp.uint32)  # (ceil(d/32),)
        self.x_sum = cp.zeros(1, dtype=cp.float32)
        self.counters = cp.zeros(2, dtype=cp.int32)  # {kept, predicted} of this step
        self.stats = cp.zeros((n_layers, 2), dtype=cp.uint64)  # accumulated {predicted, kept}
        self.idx = cp.zeros(n, dtype=cp.int32)  # (N,) active rows, first counters[0]
        self.h = cp.zeros(n, dtype=cp.float32)  # (N,) their activations
        self.y = cp.zeros(d, dtype=cp.float32)  # (d,) output

    @property
    def count(self):
        return self.counters[0:1]

    @property
    def predicted(self):
        return self.counters[1:2]

    def run(self, x, alpha_ptr=None, theta=None, norm_w=None, norm_b=None, eps: float = 1e-5, residual=None,
            layer: int = 0):
        """x (d,) fp32 device -> y (d,) = residual + FFN(norm(x)) (this object's buffer). SparseInfer with a
        device alpha (1,), or the projection predictor with device thresholds theta (N,)."""
        self.k.prepare(x, norm_w, norm_b, eps, residual, self.down_b, self.xn, self.x_signs, self.x_sum,
                       self.counters, self.y)
        if theta is not None:
            self.k.gate("projection", self.gate, self.up, self.gate_b, self.up_b, self.xn, self.x_signs, self.x_sum,
                        self.gate_signs, theta, self.threshold, self.idx, self.h, self.counters)
        else:
            self.k.gate("sparseinfer", self.gate, self.up, self.gate_b, self.up_b, self.xn, self.x_signs,
                        self.x_sum, self.gate_signs, alpha_ptr, self.threshold, self.idx, self.h, self.counters)
        self.k.down(self.down_t, self.idx, self.h, self.counters, self.stats, layer, self.y)
        return self.y

    def free(self) -> None:
        for m in (self.gate, self.up, self.down_t):
            if m is not None:
                m.free()
        for name in ("gate", "up", "down_t", "gate_b", "up_b", "down_b", "gate_signs", "xn", "x_signs", "x_sum",
                     "counters", "stats", "idx", "h", "y"):
            setattr(self, name, None)
