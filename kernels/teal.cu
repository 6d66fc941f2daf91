// TEAL column skipping: y += W mask(x) + bias, mask(x)_k = x_k if |x_k| * s_k >= t else 0, t = thr[0] and s read
// from device memory (per projection, per layer; changing them needs no recapture): s = 1 is TEAL, s = the weight
// column norms ||W[:, k]|| is WINA; t = 0 keeps every channel (the dense step's down projection). The attention
// projections of a sparse step and every projection of a TEAL (e.g. SiLU) step.
// W is stored transposed (Wt (K, N): one row per input channel), so a skipped channel is a skipped row of Wt.
// Numpy twin: CpuBackend.linear(x, lin, teal=t) (cpu_dispatch.ColumnKernels: the kept channels' rows of Wt).
//   wt (K, N) in ENC fp32 | fp16 | int8 (scale (K,) per channel) | int4 | int8c (int8 with the source's per-output-row
//   scales, scale (N,), applied after the sum); x, xs (K,) fp32; thr (1,) fp32; bias (N,) fp32 | NULL; y (N,) fp32,
//   accumulated into (the launcher zeroes it unless it holds the residual); kept (1,) u64 | NULL: += channels kept.
// Grid (column tiles of COL_TILE, channel splits), COL_THREADS threads (column_gemv.cuh). A block walks its split
// COL_THREADS channels at a time: each thread tests one, the kept ones are compacted into shared memory (warp
// ballots, a prefix over the warps), then the warps accumulate the compacted rows. N % 8 == 0.
#include "column_gemv.cuh"

#define ENC_INT8C 100  // int8 values, per-column (output) scales: the stored int8 weight transposed as it is

template <int ENC>
__device__ void teal_gemv(const void* __restrict__ wt, const __half* __restrict__ scale, int group, int K, int N,
                          int Np, const float* __restrict__ x, const float* __restrict__ xs,
                          const float* __restrict__ thr, const float* __restrict__ bias, float* __restrict__ y,
                          unsigned long long* __restrict__ kept) {
    constexpr int E = ENC == ENC_INT8C ? ENC_INT8 : ENC;
    __shared__ int rows[COL_THREADS];
    __shared__ float hs[COL_THREADS];
    __shared__ int warp_kept[COL_WARPS];
    __shared__ float red[COL_WARPS * COL_TILE];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int tile = blockIdx.x * COL_TILE, col0 = tile + 8 * lane;
    const __half* row_scale = ENC == ENC_INT8C ? nullptr : scale;
    const float t = *thr;
    const int per = (K + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per, end = min(K, begin + per);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int total = 0;
    for (int base = begin; base < end; base += COL_THREADS) {  // block-uniform trip count
        const int k = base + threadIdx.x;
        float xv = 0.f;
        bool keep = false;
        if (k < end) {
            xv = x[k];
            keep = fabsf(xv) * xs[k] >= t;  // NaN compares false: skipped
        }
        const uint32_t ballot = __ballot_sync(FULL_MASK, keep);
        if (lane == 0) warp_kept[warp] = __popc(ballot);
        __syncthreads();
        int at = 0, n = 0;
#pragma unroll
        for (int w = 0; w < COL_WARPS; ++w) {
            at += w < warp ? warp_kept[w] : 0;
            n += warp_kept[w];
        }
        if (keep) {
            at += __popc(ballot & ((1u << lane) - 1u));
            rows[at] = k;
            hs[at] = xv;
        }
        __syncthreads();
        accumulate_rows<E>(wt, row_scale, group, Np, N, col0, rows, hs, warp, n, COL_WARPS, acc);
        total += n;
        __syncthreads();  // rows, hs and warp_kept are rewritten by the next round
    }
    if (kept && blockIdx.x == 0 && threadIdx.x == 0 && total) atomicAdd(kept, (unsigned long long)total);
    const float* b = blockIdx.y == 0 ? bias : nullptr;
    if (!total && !b) return;  // block-uniform: nothing to add
    flush_columns(acc, red, tile, N, ENC == ENC_INT8C ? scale : nullptr, b, y);
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                    \
    extern "C" __global__ void __launch_bounds__(COL_THREADS)                                                       \
        teal_gemv_##SUFFIX(const void* wt, const __half* scale, int group, int K, int N, int Np, const float* x,    \
                           const float* xs, const float* thr, const float* bias, float* y, unsigned long long* kept) { \
        teal_gemv<ENC>(wt, scale, group, K, N, Np, x, xs, thr, bias, y, kept);                                      \
    }

INSTANTIATE(fp32, ENC_FP32)
INSTANTIATE(fp16, ENC_FP16)
INSTANTIATE(int8, ENC_INT8)
INSTANTIATE(int4, ENC_INT4)
INSTANTIATE(int8c, ENC_INT8C)
