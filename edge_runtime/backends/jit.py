"""numba plumbing for the cpu backend's compiled kernels: the one decorator they use, thread count, and
the scalar helpers numba lacks (fp16 widening, popcount, count-trailing-zeros).

Kernels compile lazily on first call and are cached on disk. numba caches next to the source when the
package directory is writable, else in the user's cache directory (or NUMBA_CACHE_DIR); when neither is
writable (a read-only install with a read-only home) numba refuses `cache=True` at decoration time, and we
compile without a disk cache instead: slower first call, same code.
"""

from __future__ import annotations

import os
import platform

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import carray, types
from numba.extending import intrinsic, overload

# Reassociation (vectorised reductions) and FMA contraction; no finite-math or flush-to-zero assumptions.
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})


def kernel(parallel: bool = False, inline: bool = False, reassociate: bool = True):
    """@njit(parallel, fastmath=FASTMATH, nogil=True, cache=True), or without the disk cache where none is
    writable.
    nogil: the robot's other Python threads (a control loop, ROS callbacks) keep running during a decode step;
    holding the GIL stalled them for a whole token (19-21 ms p99 on a 110M-shaped int8 model, against 0.15 ms
    idle). The kernels touch no Python object, each backend's buffers are used under its runtime's lock, and
    numba released the GIL inside its parallel loops already, so two runtimes on two threads needed a thread-safe
    threading layer (tbb or omp, numba's first choices before workqueue) before this too.
    inline: numba inlines the function into its callers' IR (a block helper shared by several kernels).
    error_model "numpy": a division by zero gives inf/nan instead of raising, so numba emits no zero check
    on integer divisions; with the checks, a loop bounded by a quotient (heads = width // head_dim) measured
    3x slower. The kernels divide only by shapes and positive sums.
    reassociate=False: sums stay in program order, so LLVM cannot vectorise a reduction over table lookups
    into gathers (vgatherqps), which on this Xeon were 1.2 x slower than the scalar loads they replace."""
    fastmath = set(FASTMATH) if reassociate else set(FASTMATH) - {"reassoc"}
    opts = {"parallel": parallel, "fastmath": fastmath, "inline": "always" if inline else "never",
            "error_model": "numpy", "nogil": True}

    def wrap(fn):
        try:
            return numba.njit(cache=True, **opts)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available": nowhere writable
            return numba.njit(cache=False, **opts)(fn)

    return wrap


@kernel()
def sum_parts(part, out):
    """out (K,) = the sum over threads of part (threads, K): the reduction after a row-split accumulation."""
    for c in range(out.shape[0]):
        s = np.float32(0.0)
        for t in range(part.shape[0]):
            s += part[t, c]
        out[c] = s


LINE_FLOATS = 16  # float32 per 64-byte cache line


def per_thread(threads: int, *shape: int) -> np.ndarray:
    """Zeros (threads, *shape) float32 for per-thread partial sums, each thread's block starting on a cache line
    of its own (last axis padded to whole lines plus one spare line). Unpadded (2, 768) accumulators shared the
    line at their boundary: two threads' down projection ran at 23.5 GB/s instead of 30."""
    last = -(-shape[-1] // LINE_FLOATS) * LINE_FLOATS + LINE_FLOATS
    padded = (threads, *shape[:-1], last)
    size = int(np.prod(padded))
    flat = np.zeros(size + LINE_FLOATS, np.float32)
    skip = (-flat.ctypes.data % 64) // 4  # floats to the first 64-byte boundary
    return flat[skip:skip + size].reshape(padded)


def max_threads() -> int:
    """The most threads a compiled kernel can run on: numba's pool, the machine's cores unless
    NUMBA_NUM_THREADS says fewer."""
    return numba.config.NUMBA_NUM_THREADS


def default_threads(step_bytes: int | None = None) -> int:
    """The cores numpy's BLAS would use: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS if set, else the CPUs this
    process may run on; one when a decode step reads under SERIAL_STEP_BYTES of weights (step_bytes)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return min(int(v), numba.config.NUMBA_NUM_THREADS)
    if step_bytes is not None and step_bytes < SERIAL_STEP_BYTES:
        return 1
    return min(len(os.sched_getaffinity(0)), numba.config.NUMBA_NUM_THREADS)


# Work smaller than this (bytes read) runs on one thread: a parallel region's fork/join costs more, and on a
# loaded machine a region waits for its slowest thread to be scheduled.
PARALLEL_MIN_BYTES = 256 << 10
# A decode step reading less weight than this is over in well under a millisecond, and waking the other threads
# for its few parallel kernels costs more than they save: the default model (3.9 MB) decodes at about 1,900
# tokens/s on one thread and 1,300 on two on the 2-core development machine.
SERIAL_STEP_BYTES = 16 << 20


def compile_pending(fn) -> bool:
    """True when numba holds no disk cache for the kernel fn yet, so that its first call compiles (the demo's
    two decode paths take about 30 s on the 2-core development machine, once after an install). Reads numba's
    cache locator, which is not public API: False when it cannot tell."""
    try:
        return not os.path.exists(fn._cache._cache_file._index_path)
    except AttributeError:
        return False


def use_threads(n: int) -> None:
    """Threads for the compiled kernels called from this thread (numba's setting is per calling thread)."""
    n = max(1, min(int(n), max_threads()))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def threads_for(nbytes: int, threads: int) -> int:
    """Threads worth using for a kernel reading nbytes."""
    return threads if nbytes >= PARALLEL_MIN_BYTES else 1


def _low32(builder, value):
    """An LLVM integer truncated (or zero-extended) to i32: numba widens uint32 arithmetic to 64 bits."""
    width = value.type.width
    i32 = ir.IntType(32)
    return value if width == 32 else builder.trunc(value, i32) if width > 32 else builder.zext(value, i32)


@intrinsic
def popcount32(typingctx, v):
    """Low 32 bits of an integer -> number of set bits (llvm.ctpop)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ctpop(_low32(builder, args[0]))

    return types.uint32(v), codegen


@intrinsic
def ctz32(typingctx, v):
    """Low 32 bits of an integer (non-zero) -> index of the lowest set bit (llvm.cttz)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.cttz(_low32(builder, args[0]), ir.Constant(ir.IntType(1), 0))

    return types.uint32(v), codegen


@intrinsic
def prefetch(typingctx, row, byte_offset):
    """Ask for the cache line at byte_offset into a 1-D array's data (llvm.prefetch: read, keep in all levels).
    A hint: it never faults. GEMV rows are short (hundreds of bytes to a few KB), too short for the hardware
    prefetcher to lock onto each one, so the kernels name the rows of the block they will read next."""
    if not isinstance(row, types.Array) or not isinstance(byte_offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.gep(builder.bitcast(data, i8p), [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(row, byte_offset), codegen


@intrinsic
def _pointer(typingctx, address, like):
    """An int64 address as a pointer to the dtype of `like` (an array, or a scalar type such as np.float32)."""
    dtype = like.dtype if isinstance(like, types.Array) else getattr(like, "instance_type", None)
    if not isinstance(address, types.Integer) or not isinstance(dtype, types.Number):
        return None
    ptr = types.CPointer(dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


@kernel(inline=True)
def view_at(address, shape, like):
    """The C-contiguous array of `shape` (a tuple) at `address`, of like's dtype: a view the caller keeps alive
    (no reference count). The fused decode step reads its per-layer arrays this way from one table of
    addresses: each array passed as an argument costs about 70 ns of unboxing per call."""
    return carray(_pointer(address, like), shape)


@intrinsic
def _bits_as_f32(typingctx, v):
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_low32(builder, args[0]), ir.FloatType())

    return types.float32(v), codegen


@kernel(inline=True)
def exp_nonpositive(x):
    """exp(x) in float32 for x <= 0 (softmax after subtracting the maximum), within 3e-7 relative of the exact
    value down to exp(-87) (inputs below -87 give exp(-87), above 0 give 1: a capped score can round a few ulp
    above its capped maximum; NaN stays NaN). libm's expf is a call per element that keeps the
    softmax loop scalar; this is arithmetic that vectorises (4.8 x on 810 scores). Cephes' expf scheme: x = n ln2
    + r with n = round(x / ln2) and ln2 split in two parts, a degree-7 polynomial in r, 2^n built in the exponent
    bits."""
    x = min(max(x, np.float32(-87.0)), np.float32(0.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _bits_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


def widen(v):
    """One stored weight element as float32: float32 itself, int8 as its value, uint16 as fp16 bits."""
    raise NotImplementedError("only callable from compiled kernels")


@intrinsic
def _half_bits_as_f32(typingctx, v):
    """fp16 bits (low 16 of an integer) -> float32 through LLVM's half type: one instruction where the CPU
    converts half precision itself (x86 F16C vcvtph2ps, AArch64 fcvt)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        a = args[0]
        i16 = ir.IntType(16)
        a = a if a.type.width == 16 else builder.trunc(a, i16) if a.type.width > 16 else builder.zext(a, i16)
        return builder.fpext(builder.bitcast(a, ir.HalfType()), ir.FloatType())

    return types.float32(v), codegen


def _native_half() -> bool:
    """Whether this CPU converts fp16 in hardware; elsewhere LLVM would call a runtime helper numba lacks."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        return "+f16c" in llvm.get_host_cpu_features().flatten().split(",")
    except RuntimeError:  # features unknown
        return False


NATIVE_HALF = _native_half()


@overload(widen, inline="always")
def _widen(v):
    if v == types.float32:
        return lambda v: v
    if v == types.int8:
        return lambda v: np.float32(v)
    if v == types.uint16 and NATIVE_HALF:  # 1.6x the LM head's speed over the bit manipulation below
        return lambda v: _half_bits_as_f32(v)
    if v == types.uint16:
        # fp16 bits -> fp32: sign to bit 31, exponent+mantissa shifted into place, then rebias the
        # exponent (15 -> 127) by multiplying with 2^112; exact for normals, subnormals and zeros
        # (inf/nan are not weights and come out finite).
        def f16(v):
            h = np.uint32(v)
            return _bits_as_f32(((h & np.uint32(0x8000)) << np.uint32(16))
                                | ((h & np.uint32(0x7FFF)) << np.uint32(13))) * np.float32(5.192296858534828e33)
        return f16
    return None


def f16_bits(a: np.ndarray) -> np.ndarray:
    """A float16 array viewed as uint16 (no copy): what the kernels read (numba has no CPU float16)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a
