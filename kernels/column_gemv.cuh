// The column GEMV's block body: y (D,) += sum over a list of rows r of h_r * Wt[r, :], Wt a packed matrix whose
// rows are the inputs (W_down^T, TEAL's W^T): the FFN's down projection (sparse_ffn.cu, over its active list) and
// TEAL column skipping (teal.cu, over the kept channels; every channel for the full dense down projection).
//
// A block is COL_WARPS warps on one tile of COL_TILE columns: lane l owns columns tile + 8l .. 8l + 7 (one 16-byte
// fp16 load a row), warp w takes rows w, w + COL_WARPS, ... of the block's list, COL_UNROLL of them in flight per
// lane (loads issued before any is used: a row is 512 B per warp, so one at a time leaves HBM idle). The warps'
// partial sums meet in shared memory and each column gets one atomicAdd per block, COL_WARPS times fewer than a
// per-thread flush. Wt in ENC fp32 | fp16 | int8 (scale (rows,) per row) | int4 (rows of Dp values, scale
// (rows, Dp / group)); D % 8 == 0, int4 group % 8 == 0.
#pragma once
#include "common.cuh"

#define COL_WARPS 8
#define COL_THREADS (COL_WARPS * WARP)
#define COL_TILE (8 * WARP)  // 256 columns a block
#define COL_UNROLL 4

// Eight weights of one row as loaded (fp32: 32 bytes; fp16: 16; int8: 8; int4: 4) and the factor to apply.
struct Raw8 {
    uint4 a, b;
    float s;
};

template <int ENC>
__device__ __forceinline__ Raw8 load8(const void* __restrict__ wt, const __half* __restrict__ scale, int group, int Dp,
                                      int r, int col0) {
    Raw8 v;
    v.s = 1.f;
    if (ENC == ENC_FP32) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const float*>(wt) + (size_t)r * Dp + col0);
        v.a = __ldg(p);
        v.b = __ldg(p + 1);
    } else if (ENC == ENC_FP16) {
        v.a = __ldg(reinterpret_cast<const uint4*>(static_cast<const __half*>(wt) + (size_t)r * Dp + col0));
    } else if (ENC == ENC_INT8) {
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(static_cast<const int8_t*>(wt) + (size_t)r * Dp + col0));
        v.a.x = q.x;
        v.a.y = q.y;
        v.s = scale ? __half2float(scale[r]) : 1.f;  // NULL: per-column scales, applied after the sum (teal int8c)
    } else {
        v.a.x = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(wt) + (size_t)r * (Dp / 2) +
                                                         col0 / 2));
        v.s = __half2float(scale[(size_t)r * (Dp / group) + col0 / group]);
    }
    return v;
}

// acc[0..7] += hv * (the eight weights of v).
template <int ENC>
__device__ __forceinline__ void fma8(const Raw8& v, float hv, float* acc) {
    if (ENC == ENC_FP32) {
        const float* f = reinterpret_cast<const float*>(&v.a);
        const float* g = reinterpret_cast<const float*>(&v.b);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc[j] += hv * f[j];
            acc[4 + j] += hv * g[j];
        }
    } else if (ENC == ENC_FP16) {
        const __half2* p = reinterpret_cast<const __half2*>(&v.a);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __half22float2(p[j]);
            acc[2 * j] += hv * f.x;
            acc[2 * j + 1] += hv * f.y;
        }
    } else if (ENC == ENC_INT8) {
        const int8_t* q = reinterpret_cast<const int8_t*>(&v.a);
        const float s = hv * v.s;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += s * float(q[j]);
    } else {
        const float s = hv * v.s;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t b = (v.a.x >> (8 * j)) & 0xFF;
            acc[2 * j] += s * float(int(b & 0xF) - 8);
            acc[2 * j + 1] += s * float(int(b >> 4) - 8);
        }
    }
}

// acc += sum over i = first, first + stride, ... < count of hs[i] * Wt[rows[i], col0 .. col0 + 7]. rows and hs in
// shared or global memory; a lane whose columns lie past D (the last tile) reads nothing.
template <int ENC>
__device__ __forceinline__ void accumulate_rows(const void* __restrict__ wt, const __half* __restrict__ scale,
                                                int group, int Dp, int D, int col0, const int* rows, const float* hs,
                                                int first, int count, int stride, float* acc) {
    if (col0 >= D) return;
    int i = first;
    for (; i + (COL_UNROLL - 1) * stride < count; i += COL_UNROLL * stride) {
        Raw8 v[COL_UNROLL];
        float hv[COL_UNROLL];
#pragma unroll
        for (int u = 0; u < COL_UNROLL; ++u) {
            hv[u] = hs[i + u * stride];
            v[u] = load8<ENC>(wt, scale, group, Dp, rows[i + u * stride], col0);
        }
#pragma unroll
        for (int u = 0; u < COL_UNROLL; ++u) fma8<ENC>(v[u], hv[u], acc);
    }
    for (; i < count; i += stride) fma8<ENC>(load8<ENC>(wt, scale, group, Dp, rows[i], col0), hs[i], acc);
}

// y[tile + c] += (sum over the block's warps of their acc for column c) * colscale[c] + bias[c] (either NULL:
// none), one atomicAdd per column. Whole block (COL_THREADS threads), uniform control flow. red: shared
// float[COL_WARPS * COL_TILE]; layout red[w][j * 32 + lane] (column 8 * lane + j), conflict-free both ways.
__device__ __forceinline__ void flush_columns(const float* acc, float* red, int tile, int D,
                                              const __half* __restrict__ colscale, const float* __restrict__ bias,
                                              float* y) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
#pragma unroll
    for (int j = 0; j < 8; ++j) red[warp * COL_TILE + j * WARP + lane] = acc[j];
    __syncthreads();
    const int p = threadIdx.x;  // COL_THREADS == COL_TILE: one column a thread
    const int col = tile + (p % WARP) * 8 + p / WARP;
    if (col < D) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < COL_WARPS; ++w) s += red[w * COL_TILE + p];
        if (colscale) s *= __half2float(colscale[col]);
        if (bias) s += bias[col];
        atomicAdd(y + col, s);
    }
}
