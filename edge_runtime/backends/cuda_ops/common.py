"""Shared by the CUDA launchers: CuPy import, kernel sources and their RawModule cache, argument checks, the
device matrix (a packed weight uploaded as stored), and the step-buffer layout.

Every launcher writes into caller-provided buffers, allocates nothing per call and checks every argument's
type, dtype, shape and contiguity (EdgeRuntimeError naming the argument). Per-token values (token id,
position, per-layer knobs, RNG counter) are device arrays read by the kernels, so that one captured CUDA
graph can be replayed every step; host scalars are model constants only.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, install_extra

# int32 step buffer (STEP_SIZE,): kernels/common.cuh STEP_* must agree.
STEP_TOKEN, STEP_POS, STEP_RNG = 0, 1, 2
STEP_SIZE = 4
THREADS = 256  # row kernels: 8 warps, one row per warp at a time
BLOCKS_PER_SM = 4  # row kernels' grid cap: x is loaded once per block, which then serves many rows
SMEM_DEFAULT = 48 << 10  # dynamic shared memory without the opt-in attribute
NULL = np.uint64(0)  # an absent pointer argument: 8 zero bytes, what a `const T*` parameter reads as nullptr

_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.M)


def cupy():
    try:
        import cupy
    except ImportError:
        raise EdgeRuntimeError(f"the CUDA kernels need CuPy ({install_extra('cuda')})") from None
    return cupy


def kernel_source(name: str) -> Path:
    """kernels/<name> of a checkout, else where a wheel installs it (<prefix>/share/edge-runtime/kernels)."""
    for d in (Path(__file__).resolve().parents[3] / "kernels", Path(sys.prefix) / "share" / "edge-runtime" / "kernels"):
        if (d / name).is_file():
            return d / name
    raise EdgeRuntimeError(f"kernel source {name} not found; reinstall edge-runtime")


def source_text(name: str) -> str:
    """The kernel file with its local #include "x.cuh" lines replaced by the header (NVRTC gets one text)."""
    path = kernel_source(name)
    return _INCLUDE.sub(lambda m: source_text(m.group(1)).replace("#pragma once", ""), path.read_text())


def capture_graph(stream, issue: Callable[[], None]):
    """The device work issue() puts on `stream`, captured as a CUDA graph. On an error the capture is ended, so
    the stream stays usable, and issue()'s error is raised rather than end_capture's."""
    stream.begin_capture()
    try:
        issue()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.end_capture()
        raise
    return stream.end_capture()


_modules: dict[str, object] = {}


class KernelInfo(NamedTuple):
    static_smem: int  # bytes of shared memory the kernel declares (load_x's 128 B reduction buffer)
    registers: int  # per thread; 0 where the driver does not say (the emulator)
    max_threads: int  # the largest block its registers allow


class Module:
    """One kernels/<file>.cu compiled once per process (CuPy caches the binary on disk), its kernels by name."""

    def __init__(self, name: str):
        cp = cupy()
        if name not in _modules:
            _modules[name] = cp.RawModule(code=source_text(name), options=("-std=c++17",))
        self.raw = _modules[name]
        self._k: dict[str, object] = {}
        self._info: dict[str, KernelInfo] = {}

    def __call__(self, name: str):
        if name not in self._k:
            self._k[name] = self.raw.get_function(name)
        return self._k[name]

    def launch(self, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        """Launch, raising the kernel's dynamic shared-memory limit first when static + dynamic shared memory
        pass 48 KB: without the opt-in a kernel may take 48 KB less its static shared memory (load_x's 128 B
        reduction buffer makes a 48 KB request fail). Blocks are whole warps, at most 1024 threads and at most
        what the compiled kernel's registers allow: the kernels' FULL_MASK shuffles and block reductions assume
        it. An absent optional pointer (None) goes as a uint64 zero, NULL: CuPy 13 passes None as a NULL
        *address of* the argument, so the kernel would read garbage instead of testing `if (p)`."""
        threads = int(np.prod(block))
        if not 0 < threads <= 1024 or threads % 32:
            raise EdgeRuntimeError(f"{name}: a block must be whole warps, at most 1024 threads; got {block}")
        k, info = self(name), self.info(name)
        if threads > info.max_threads:
            raise EdgeRuntimeError(f"{name}: a block of {threads} threads, the compiled kernel allows "
                                   f"{info.max_threads} (its registers per thread)")
        args = tuple(NULL if a is None else a for a in args)
        if shared_mem:
            static = info.static_smem
            if shared_mem + static > SMEM_DEFAULT:
                limit = smem_optin()
                if shared_mem + static > limit:
                    raise EdgeRuntimeError(f"{name} needs {shared_mem + static} B of shared memory ({static} B "
                                           f"static), the device allows {limit} B")
                if (k.max_dynamic_shared_size_bytes or 0) < shared_mem:
                    k.max_dynamic_shared_size_bytes = shared_mem
        k(grid, block, args, shared_mem=shared_mem)

    def info(self, name: str) -> KernelInfo:
        """What the driver says of the compiled kernel, asked once (each attribute is a driver call)."""
        if name not in self._info:
            k = self(name)
            self._info[name] = KernelInfo(int(getattr(k, "shared_size_bytes", 0) or 0),
                                          int(getattr(k, "num_regs", 0) or 0),
                                          int(getattr(k, "max_threads_per_block", 1024) or 1024))
        return self._info[name]


_attributes: dict[int, dict] = {}


def device_attribute(name: str, default: int) -> int:
    """An attribute of the current device, read once per device: CuPy's Device().attributes queries every
    attribute the driver has on each access, and the launchers ask on every launch."""
    dev = cupy().cuda.Device()
    if dev.id not in _attributes:
        _attributes[dev.id] = dict(dev.attributes)
    return int(_attributes[dev.id].get(name, default))


def smem_optin() -> int:
    return device_attribute("MaxSharedMemoryPerBlockOptin", SMEM_DEFAULT)


def resident_blocks(per_sm: int = BLOCKS_PER_SM) -> int:
    """per_sm blocks on every SM of the device: a grid that runs in one wave."""
    return per_sm * device_attribute("MultiProcessorCount", 16)


def row_grid(n_rows: int, threads: int = THREADS, max_blocks: int | None = None, smem: int = 0,
             regs: int = 0) -> tuple[int]:
    """Blocks for a grid-stride row kernel: one row per warp, capped at the blocks that are resident at once
    (BLOCKS_PER_SM per SM, fewer when smem bytes of dynamic shared memory or regs registers per thread allow
    fewer): a block past that would wait for a second wave and load x again, and its rows end the GEMV late.
    max_blocks overrides the cap."""
    if max_blocks is None:
        per_sm = BLOCKS_PER_SM
        if smem:  # 1 KB a block is the driver's reserve; static shared memory here is under 1 KB
            per_sm = max(1, min(per_sm, device_attribute("MaxSharedMemoryPerMultiprocessor", 0) // (smem + 2048)))
        if regs:  # registers are given out per warp in units of 256 (8 a thread)
            per_block = (threads // 32) * 256 * -(-regs * 32 // 256)
            per_sm = max(1, min(per_sm, device_attribute("MaxRegistersPerMultiprocessor", 65536) // per_block))
        max_blocks = resident_blocks(per_sm)
    return (max(1, min(-(-n_rows // (threads // 32)), max_blocks)),)


CSR_SEG_VALUES = 2048  # kernels/common.cuh: a compressed row's values staged per warp, 2048 at a time
CSR_VALUE_BYTES = {"csr_fp16": 2, "csr_int8": 1}


def row_smem(m, threads: int = THREADS) -> int:
    """Dynamic shared memory of a row kernel over DeviceMatrix m: x (4 * Kp bytes), plus for compressed rows a
    value stage per warp."""
    return 4 * m.kp + (threads // 32) * CSR_SEG_VALUES * CSR_VALUE_BYTES.get(m.kenc, 0)


COL_THREADS, COL_TILE = 256, 256  # kernels/column_gemv.cuh: 8 warps on a tile of 256 columns


def column_grid(n_cols: int, n_rows: int, splits: int | None = None) -> tuple[int, int]:
    """Grid of a column kernel (column_gemv.cuh): (column tiles, row splits). splits None: enough splits for
    BLOCKS_PER_SM blocks per SM (a 7B down projection has only 16 tiles of columns), at least 32 rows each."""
    tiles = -(-n_cols // COL_TILE)
    if splits is None:
        splits = min(-(-resident_blocks() // tiles), -(-n_rows // 32))
    return tiles, max(1, min(splits, n_rows))


def overlaps(a, b) -> bool:
    """Whether two device arrays share memory (views included): kernels take their inputs __restrict__."""
    if a is None or b is None:
        return False
    a0, b0 = a.data.ptr, b.data.ptr
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def check(a, dtype, shape, what: str) -> None:
    """a must be a contiguous device array of this dtype and shape (-1 in shape: any length)."""
    cp = cupy()
    if a is None or not isinstance(a, cp.ndarray):
        raise EdgeRuntimeError(f"{what}: want a device array, got {type(a).__name__}")
    ok = len(a.shape) == len(shape) and all(s in (-1, t) for s, t in zip(shape, a.shape, strict=True))
    if a.dtype != np.dtype(dtype) or not ok or not a.flags.c_contiguous:
        raise EdgeRuntimeError(f"{what}: want {np.dtype(dtype).name}{tuple(shape)} contiguous, got {a.dtype}"
                               f"{tuple(a.shape)}{'' if a.flags.c_contiguous else ' non-contiguous'}")


def check_opt(a, dtype, shape, what: str) -> None:
    """check(), or None (the kernel tests the pointer)."""
    if a is not None:
        check(a, dtype, shape, what)


def i32(v) -> np.int32:
    return np.int32(v)


def f32(v) -> np.float32:
    return np.float32(v)


# Encoding suffix of the kernels and the K alignment of their 16-byte loads.
DENSE_ALIGN = {"fp32": 4, "fp16": 8, "int8": 16, "int4": 32}
KERNEL_ENC = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "int4", "sparse-fp16": "csr_fp16",
              "sparse-int8": "csr_int8"}


def tile_offsets(bitmap: np.ndarray) -> np.ndarray:
    """(N, ceil(K/COL_TILE)) int32: kept values of each compressed row before each tile of COL_TILE columns.
    bitmap (N, ceil(K/8)) uint8; a tile is COL_TILE / 8 bitmap bytes. 4 bytes a row a tile (1.6 % of a 50 %
    sparse fp16 row)."""
    n, kb = bitmap.shape
    per_tile_bytes = COL_TILE // 8
    tiles = -(-kb // per_tile_bytes)
    padded = np.zeros((n, tiles * per_tile_bytes), np.uint8)  # whole tiles; padding bytes keep nothing
    padded[:, :kb] = bitmap
    kept = np.bitwise_count(padded).reshape(n, tiles, per_tile_bytes).sum(axis=2, dtype=np.int32)
    return np.ascontiguousarray(np.cumsum(kept, axis=1, dtype=np.int32) - kept)


class DeviceMatrix:
    """A packed logical (N, K) matrix on the device, in its stored encoding (edge_runtime/pack/quant.py,
    sparse_weights.py). Fields are what the kernels take:
      w        fp32 | fp16 (N, K) | int8 (N, K) | uint8 (N, Kp/2) int4 | compressed values (nnz,) fp16 | int8
      scale    fp16 (N,) int8 | (N, Kp/group) int4 | (1,) unused placeholder
      bitmap   uint8 (N, ceil(K/8)) and row_offsets int64 (N+1,): compressed rows only, else (1,) placeholders
      tile_offsets int32 (N, ceil(K/COL_TILE)): compressed rows uploaded with column_kernel=True (W_down^T for
               csr_down) only, else a (1,) placeholder: each row's kept values before each tile of COL_TILE
               columns, derived here (device memory only, 4 B a row a tile: 1.6 % of a 50 % sparse fp16 row)
      group    int4 group (0 otherwise); kp: K padded to the group (int4), to 8 (compressed rows), else K
    Checked at upload: the layout the kernels index (row stride Kp/2, Kp/group scales, group % 32 == 0); the
    launchers check the alignment their kernel needs (check_row_kernel, check_column_kernel)."""

    def __init__(self, packed, column_kernel: bool = False):
        cp = cupy()
        enc = packed.encoding
        if enc not in KERNEL_ENC:
            raise EdgeRuntimeError(f"no CUDA kernel for encoding {enc!r} (have {', '.join(KERNEL_ENC)})")
        n, k = packed.shape
        self.encoding, self.shape, self.kenc = enc, (int(n), int(k)), KERNEL_ENC[enc]
        self.group, self.kp = int(packed.group_size or 0), int(k)
        a = packed.arrays
        if enc == "int4":
            g = self.group
            if g <= 0 or g % 32:
                raise EdgeRuntimeError(f"int4 kernels need the group to be a multiple of 32, got {g}")
            self.kp = -(-k // g) * g
            if a["q"].shape != (n, self.kp // 2) or a["scale"].shape != (n, self.kp // g):
                raise EdgeRuntimeError(f"int4 layout: want q (N, Kp/2) = {(n, self.kp // 2)} and scale (N, Kp/group) = "
                                       f"{(n, self.kp // g)}, got {a['q'].shape}, {a['scale'].shape}")
        values = a["w"] if enc in ("fp32", "fp16") else a["q"] if "q" in a else a["values"]
        self.w = cp.asarray(np.ascontiguousarray(values))
        if enc.startswith("sparse-"):
            if a["bitmap"].shape != (n, -(-k // 8)) or a["row_offsets"].shape != (n + 1,):
                raise EdgeRuntimeError("compressed rows: bitmap (N, ceil(K/8)) and row_offsets (N+1,) expected")
            self.kp = -(-k // 8) * 8  # x's shared layout for the bit walk: 8 columns a bitmap byte
            self.bitmap = cp.asarray(np.ascontiguousarray(a["bitmap"], dtype=np.uint8))
            self.row_offsets = cp.asarray(np.ascontiguousarray(a["row_offsets"], dtype=np.int64))
            self.tile_offsets = cp.asarray(tile_offsets(np.asarray(a["bitmap"], dtype=np.uint8))) if column_kernel \
                else cp.zeros(1, cp.int32)
        else:
            self.bitmap, self.row_offsets = cp.zeros(1, cp.uint8), cp.zeros(1, cp.int64)
            self.tile_offsets = cp.zeros(1, cp.int32)
        has_scale = "scale" in a
        self.scale = cp.asarray(np.ascontiguousarray(a["scale"], dtype=np.float16)) if has_scale else \
            cp.zeros(1, dtype=cp.float16)
        self.nbytes = int(self.w.nbytes + (self.scale.nbytes if has_scale else 0)
                          + (self.bitmap.nbytes + self.row_offsets.nbytes + self.tile_offsets.nbytes
                             if self.sparse else 0))

    @classmethod
    def int8_columns(cls, packed) -> DeviceMatrix:
        """W^T (K, N) of an int8 (N, K) weight as stored, for TEAL column skipping: the values transposed, the
        per-output-row scales (N,) kept and applied after the sum (kernel suffix int8c). Column kernels only."""
        cp = cupy()
        n, k = packed.shape
        m = cls.__new__(cls)
        m.encoding, m.shape, m.kenc, m.group, m.kp = "int8-columns", (int(k), int(n)), "int8c", 0, int(n)
        m.w = cp.asarray(np.ascontiguousarray(np.asarray(packed.arrays["q"]).T))  # (K, N) int8
        m.scale = cp.asarray(np.ascontiguousarray(packed.arrays["scale"], dtype=np.float16))  # (N,)
        m.bitmap, m.row_offsets, m.tile_offsets = cp.zeros(1, cp.uint8), cp.zeros(1, cp.int64), cp.zeros(1, cp.int32)
        m.nbytes = int(m.w.nbytes + m.scale.nbytes)
        return m

    @property
    def sparse(self) -> bool:
        return self.encoding.startswith("sparse-")

    def row_args(self) -> tuple:
        """(w, scale, group, bitmap, row_offsets): how the row kernels take a matrix."""
        return self.w, self.scale, i32(self.group), self.bitmap, self.row_offsets

    def check_row_kernel(self, what: str) -> None:
        """Row dots (gemv, FFN gate/up) read 16 bytes a lane: fp32 K % 4, fp16 K % 8, int8 K % 16 (int4: padded
        rows)."""
        need = DENSE_ALIGN.get(self.encoding, 1) if self.encoding != "int4" else 1
        if self.shape[1] % need:
            raise EdgeRuntimeError(f"{what}: {self.encoding} row kernels need K % {need} == 0, got K = {self.shape[1]}")

    def check_column_kernel(self, what: str) -> None:
        """Accumulations over rows (FFN down, TEAL) give each thread 8 columns: row length % 8 == 0 (compressed
        rows: any length, with their tile offsets)."""
        if self.sparse:
            tiles = -(-self.shape[1] // COL_TILE)
            if self.tile_offsets.shape != (self.shape[0], tiles):
                raise EdgeRuntimeError(f"{what}: compressed rows need their tile offsets for the column kernel; "
                                       f"upload with DeviceMatrix(packed, column_kernel=True)")
            return
        if self.shape[1] % 8:
            raise EdgeRuntimeError(f"{what}: kernels over rows of a transposed matrix need its row length % 8 == 0, "
                                   f"got {self.shape[1]}")

    def free(self) -> None:
        self.w = self.scale = self.bitmap = self.row_offsets = self.tile_offsets = None


def as_matrix(m) -> DeviceMatrix:
    if not isinstance(m, DeviceMatrix):
        raise EdgeRuntimeError(f"want a DeviceMatrix (upload with DeviceMatrix(packed)), got {type(m).__name__}")
    if m.w is None:
        raise EdgeRuntimeError("DeviceMatrix used after free()")
    return m
